"""What a worker does at the edges of its machine: a second live process with its worker id (two machines
started with one MACHINE_ID), a machine-local fault (full disk, an output folder that cannot be written),
a result too large for Redis' pub/sub, a progress message of megabytes. Real worker processes, real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis as redis_lib

from emp_machine.connectors.base import JobResult
from emp_machine.runtime import outputs
from emp_machine.runtime.jobs import JobStore
from _helpers import install_plugin
from harness import Messages, WorkerProcs, wait_for

PLUGIN = '''
import asyncio, errno, os
from emp_machine.connectors.base import Connector, JobResult

class EdgeConnector(Connector):
    name = "edge"

    async def run(self, job, progress):
        p = job.payload if isinstance(job.payload, dict) else {}
        if p.get("progress_kb"):
            await progress(50, "m" * (p["progress_kb"] * 1024))
        if p.get("unreadable"):  # a file the job names that this user cannot read: the job's fault
            raise PermissionError(errno.EACCES, "Permission denied", p["unreadable"])
        if p.get("disk_full_while") and os.path.exists(p["disk_full_while"]):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.context.output_dir))
        if p.get("rows"):  # a large result of small items, built before the gate file says so
            rows = ["abcdefgh"] * p["rows"]
            open(p["built"], "w").close()
            await asyncio.sleep(0.3)
            return JobResult(data={"rows": rows})
        if p.get("result_mb"):
            n = p["result_mb"] * 1024 * 1024 // 100
            return JobResult(data={"items": ["x" * 96 for _ in range(n)]})
        return JobResult(data={"ok": True, "attempt": job.attempt})
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("edge")
    install_plugin(site, "emp_plugin_edge", PLUGIN, {"edge": "EdgeConnector"})
    sys.path.insert(0, str(site))  # the manifest is validated here too, against installed connectors
    yield site
    sys.path.remove(str(site))


@pytest.fixture
def client(redis_server):
    c = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    yield c
    c.close()


def _edge(site, tmp_path, redis_url, name="w", machine_id=None, lease="3s"):
    body = f"workers:\n  edge:\n    connector: edge\n    job_types: [edge]\n    lease: {lease}\n"
    return WorkerProcs(body, tmp_path / name, redis_url, machine_id=machine_id or f"m{uuid.uuid4().hex[:8]}",
                       environ={"PYTHONPATH": str(site)})


def _sim(tmp_path, redis_url, name, machine_id, lease="", job_type="dupsim"):
    body = f"workers:\n  sim:\n    connector: simulation\n    job_types: [{job_type}]\n" + (
        f"    lease: {lease}\n" if lease else "")
    return WorkerProcs(body, tmp_path / name, redis_url, machine_id=machine_id)


def status_of(client, job_id):
    return client.hget(f"job:{job_id}", "status")


# -- 1. one worker id, two live processes -------------------------------------------------------------------
def test_a_second_machine_with_the_same_id_refuses_to_start_and_takes_no_job(client, redis_url, tmp_path):
    # Two machines started with one MACHINE_ID (a copied env) shared worker ids: each handed the other's
    # running job back (at start, and as heartbeat strays); jobs ran 16-17 times in 30 s, never finishing.
    machine_id = f"dup{uuid.uuid4().hex[:6]}"
    first = _sim(tmp_path, redis_url, "a", machine_id, lease="3s")
    second = _sim(tmp_path, redis_url, "b", machine_id, lease="3s")
    msgs = Messages(client, "job_claimed")
    try:
        first.start()
        first.wait_up(client)
        job_id = JobStore(client).submit("dupsim", {"steps": 30, "step_ms": 100})  # a 3 s job
        wait_for(lambda: status_of(client, job_id) == "in_progress", message="the job running on the first")
        second.start()
        assert second.wait_exit(0, timeout=20) != 0  # refused: supervisord shows it errored
        log = second.log(0)
        wid = first.ids[0]
        assert f"worker id {wid} is already in use by another live process" in log
        assert f"machine id {machine_id}" in log and "MACHINE_ID" in log and "Traceback" not in log
        assert '"worker.spawned"' not in log
        wait_for(lambda: status_of(client, job_id) == "completed", 15, message="the job completed")
        assert len(msgs.of("job_claimed", job_id=job_id)) == 1  # claimed once, never handed back
        assert client.hget(f"job:{job_id}", "retry_count") == "0"
        assert first.procs[0].poll() is None  # the first one goes on
    finally:
        msgs.close()
        first.close()
        second.close()


def test_a_worker_that_finds_its_id_taken_over_while_running_gives_it_up(client, redis_url, tmp_path):
    # Both registered at once (neither saw the other at start): the one whose token is no longer in
    # worker:{id} stops at its next heartbeat rather than hand the other's jobs back as its strays.
    procs = _sim(tmp_path, redis_url, "a", f"to{uuid.uuid4().hex[:6]}", lease="3s", job_type="takensim")
    try:
        procs.start()
        procs.wait_up(client)
        wid = procs.ids[0]
        other = f"1-abcdef012345-{'0' * 12}"  # another pid space: a process this one cannot see
        store = JobStore(client)
        # The other process is alive: it writes its token again whenever it finds ours (as its beats do)
        deadline = time.monotonic() + 15
        while procs.procs[0].poll() is None and time.monotonic() < deadline:
            if client.hget(f"worker:{wid}", "instance") != other:
                store.register_worker(wid, "other", {"services": ["dupsim"]}, instance=other)
            time.sleep(0.05)  # pacing the other process's writes, not a synchronisation
        assert procs.wait_exit(0, timeout=15) != 0
        log = procs.log(0)
        assert f"worker id {wid} is already in use by another live process" in log and "this worker stops" in log
        assert client.hget(f"worker:{wid}", "instance") == f"1-abcdef012345-{'0' * 12}"  # left to the other
    finally:
        procs.close()


def test_a_dead_predecessors_token_brought_back_by_redis_does_not_stop_a_running_worker(
        client, redis_url, tmp_path):
    # A Redis restored from an older snapshot (or a replica behind) brings back worker:{id} as our own dead
    # predecessor registered it: every running worker took that for a live duplicate, handed its jobs back
    # and exited 1. The token is now written back, once, and the worker carries on.
    from emp_machine.runtime.identity import pid_space as _pid_space

    dead = subprocess.Popen(["true"])
    dead.wait()
    procs = _sim(tmp_path, redis_url, "r", f"rs{uuid.uuid4().hex[:6]}", lease="3s", job_type="restoredsim")
    try:
        procs.start()
        procs.wait_up(client)
        wid = procs.ids[0]
        mine = client.hget(f"worker:{wid}", "instance")
        store = JobStore(client)
        job_id = store.submit("restoredsim", {"steps": 20, "step_ms": 200})
        wait_for(lambda: status_of(client, job_id) == "in_progress", message="the job running")
        client.hset(f"worker:{wid}", "instance", f"{dead.pid}-abcdef012345-{_pid_space()}")
        wait_for(lambda: client.hget(f"worker:{wid}", "instance") == mine, 15, message="its token written back")
        wait_for(lambda: status_of(client, job_id) == "completed", 20,
                 message=f"the job completed\n{procs.log(0)[-2000:]}")
        assert procs.procs[0].poll() is None and "this worker stops" not in procs.log(0)
        assert [e["ev"] for e in store.timeline(job_id).events].count("claimed") == 1
        # said in words the log's redaction leaves alone ("another token: registering" read as a secret's
        # value came out "another token: [REDACTED] again", audit BZ)
        assert "held by another instance: registering again" in procs.log(0), procs.log(0)[-2000:]
    finally:
        procs.close()


def test_a_restarted_worker_takes_its_dead_predecessors_id_over_at_once(client, redis_url, tmp_path):
    # Its predecessor was SIGKILLed: its heartbeat key lives on for up to 60 s, but its pid is gone. The
    # restart must not wait that out (nor one heartbeat interval: 20 s with the default lease). The hand-back
    # is also said on the contract's channel, as the reaper says an expired lease: the API's last word on the
    # job was its progress on the dead worker until some worker claimed it again (helper-188).
    procs = _sim(tmp_path, redis_url, "a", f"re{uuid.uuid4().hex[:6]}", job_type="restartsim")  # lease 60 s
    msgs = Messages(client, "job_requeued", "job_failed")
    try:
        procs.start()
        procs.wait_up(client)
        wid = procs.ids[0]
        job_id = JobStore(client).submit("restartsim", {"steps": 1000, "step_ms": 100})
        wait_for(lambda: status_of(client, job_id) == "in_progress", message="the job running")
        procs.signal(0, signal.SIGKILL)
        procs.wait_exit(0)
        assert client.exists(f"worker:{wid}:heartbeat")
        started = time.monotonic()
        procs.start(0)
        wait_for(lambda: sum('"worker.spawned"' in line for line in procs.log(0).splitlines()) == 2, 15,
                 message="the restarted worker up")
        assert time.monotonic() - started < 10
        wait_for(lambda: msgs.of("job_requeued", job_id=job_id, reason="worker restarted"), 10,
                 message="the orphan handed back")
        [failed] = msgs.of("job_failed", job_id=job_id)
        assert failed == {"job_id": job_id, "worker_id": wid, "status": "pending",
                          "error": "attempt lost: worker restarted", "failed_at": failed["failed_at"],
                          "retry_count": 0, "can_retry": True, "timestamp": failed["timestamp"]}
        assert client.hget(f"job:{job_id}", "retry_count") == "0"  # no attempt counted
    finally:
        msgs.close()
        procs.close()


# -- 2, 3. machine-local faults -------------------------------------------------------------------------------
def test_a_full_disk_hands_the_job_back_uncounted_and_pauses_claims_until_a_write_passes(
        site, client, redis_url, tmp_path):
    # Counted as any retryable failure, a full disk turned every queued job into a final failure within
    # milliseconds (its 3 attempts bounced between this machine's workers in 27 ms).
    flag = tmp_path / "disk-full"
    flag.write_text("")
    procs = _edge(site, tmp_path, redis_url)
    msgs = Messages(client, "job_failed", "complete_job")
    try:
        procs.start()
        procs.wait_up(client)
        job_id = JobStore(client).submit("edge", {"disk_full_while": str(flag)}, max_retries=3)
        wait_for(lambda: '"resource.exhausted"' in procs.log(0), message="resource.exhausted logged")
        line = next(json.loads(x) for x in procs.log(0).splitlines() if '"resource.exhausted"' in x)
        assert "free disk space" in json.dumps(line)
        wait_for(lambda: status_of(client, job_id) == "pending", message="the job back in the queue")
        assert client.hget(f"job:{job_id}", "retry_count") == "0"
        flag.unlink()  # space again: a probe write passes, claims resume
        wait_for(lambda: status_of(client, job_id) == "completed", 20, message="the job completed")
        assert client.hget(f"job:{job_id}", "retry_count") == "0" and not msgs.of("job_failed", job_id=job_id)
        # the worker's own event, though the job's fault started the watch: none of the job's ids (it was
        # filed under the job, or, the job unsampled, shed with its records and never written)
        (resumed,) = [json.loads(x) for x in procs.log(0).splitlines() if '"worker.claims_resumed"' in x]
        assert "job_id" not in resumed and "trace_id" not in resumed, resumed
    finally:
        msgs.close()
        procs.close()


@pytest.mark.parametrize("fault", ["unreadable", "too_big"])
def test_a_fault_of_the_jobs_own_is_counted_the_second_time_and_the_job_ends(
        site, client, redis_url, tmp_path, fault):
    # A machine-local errno raised while the output folder takes writes (EACCES on a file the job names; ENOSPC
    # for an output bigger than the disk's free space) was handed back uncounted at every attempt: the job went
    # round for ever. The second such fault of one job on a worker whose probe passes counts.
    flag = tmp_path / "always"
    flag.write_text("")
    payload = {"unreadable": "/models/private.bin"} if fault == "unreadable" else {"disk_full_while": str(flag)}
    procs = _edge(site, tmp_path, redis_url)
    try:
        procs.start()
        procs.wait_up(client)
        job_id = JobStore(client).submit("edge", payload, max_retries=1)
        wait_for(lambda: status_of(client, job_id) == "failed", 30, message=f"the job failed\n{procs.log(0)[-3000:]}")
        error = client.hget(f"job:{job_id}", "error")
        assert ("Permission denied" if fault == "unreadable" else "No space left") in error, error
        exhausted = [line for line in procs.log(0).splitlines() if '"resource.exhausted"' in line]
        assert len(exhausted) == 1, exhausted  # the first fault only
    finally:
        procs.close()


def test_an_output_folder_that_is_a_file_is_reported_at_start_and_no_job_is_claimed_meanwhile(
        redis_url, client, tmp_path):
    # state/outputs/<worker> being a file failed every job for good (ENOTDIR, blamed on the job).
    procs = _sim(tmp_path, redis_url, "a", f"od{uuid.uuid4().hex[:6]}", job_type="odsim")
    outputs_dir = tmp_path / "a" / "outputs"
    outputs_dir.mkdir(parents=True)
    blocker = outputs_dir / procs.ids[0]
    blocker.write_text("not a folder")
    msgs = Messages(client, "job_failed")
    try:
        job_id = JobStore(client).submit("odsim", {"steps": 1, "step_ms": 1, "output_bytes": 10})
        procs.start()
        procs.wait_up(client)
        log = procs.log(0)
        assert f"cannot write to the worker's output folder {blocker}" in log and "no job is claimed" in log
        assert status_of(client, job_id) == "pending"
        blocker.unlink()
        wait_for(lambda: status_of(client, job_id) == "completed", 20, message="the job completed")
        assert client.hget(f"job:{job_id}", "retry_count") == "0" and not msgs.of("job_failed", job_id=job_id)
    finally:
        msgs.close()
        procs.close()


def test_machine_local_errnos_include_enotdir_and_eperm():
    import errno

    from emp_machine.errors import RetryableJobError, classify, machine_local_hint

    for code in (errno.ENOTDIR, errno.EPERM, errno.ENOSPC):
        error = OSError(code, os.strerror(code), "/state/outputs/w")
        assert machine_local_hint(error) and machine_local_hint(classify(error))
        assert isinstance(classify(error), RetryableJobError)
    assert machine_local_hint(OSError(errno.ENOENT, "gone")) is None


# -- 4. no empty job folders --------------------------------------------------------------------------------
def test_a_failed_simulation_write_leaves_no_empty_job_folder(tmp_path):
    from emp_machine.connectors._http import job_dir
    from emp_machine.connectors.simulation import SimulationConnector, SimulationSettings
    from _helpers import connector_context

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    context = connector_context(tmp_path, "simulation")
    connector = SimulationConnector(SimulationSettings(), context)
    directory = job_dir(context.output_dir, "job-full")
    directory.mkdir(parents=True)
    (directory / "simulation.bin").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(OSError):
        connector._write_output("job-full", 10)
    assert not directory.exists()
    # and one whose folder cannot even be made (a file in its parent's place)
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    context2 = connector_context(blocked, "simulation")  # output_dir = blocked/out: under a file
    with pytest.raises(OSError):
        SimulationConnector(SimulationSettings(), context2)._write_output("job-x", 10)


# -- 5. results too large for Redis -------------------------------------------------------------------------
def test_cap_stores_a_large_result_of_small_strings_as_a_file(tmp_path):
    data = {"items": ["x" * 96 for _ in range(30_000)]}  # ~3 MB, no string over any spill threshold
    result = JobResult(data=data, service_metadata={"connector": "edge"})
    assert not outputs.needs_spill(result) and outputs.result_size(result) > outputs.RESULT_MAX_BYTES
    capped = outputs.cap(result, tmp_path / "job")
    assert outputs.result_size(capped) < 4096
    ref = capped.data
    assert ref["mime_type"] == "application/json" and ref["stored_as_file"] is True and "1 MiB" in ref["note"]
    assert json.loads(open(ref["path"], encoding="utf-8").read()) == data
    assert ref["size_bytes"] == os.path.getsize(ref["path"])
    assert [o.path for o in capped.outputs] == [ref["path"]]
    assert capped.service_metadata == {"connector": "edge"}
    small = JobResult(data={"ok": True})
    assert outputs.cap(small, tmp_path / "job2") is small and not (tmp_path / "job2").exists()


def test_a_large_result_reaches_redis_as_a_reference(site, client, redis_url, tmp_path):
    # 50 MB of 96-character strings was written whole into jobs:completed and published on complete_job:
    # Redis disconnected the API's subscriber (pub/sub output buffer limit 32 MB).
    procs = _edge(site, tmp_path, redis_url)
    msgs = Messages(client, "complete_job")
    try:
        procs.start()
        procs.wait_up(client)
        job_id = JobStore(client).submit("edge", {"result_mb": 5})
        wait_for(lambda: status_of(client, job_id) == "completed", 30, message="the job completed")
        entry = client.hget("jobs:completed", job_id) or ""
        assert 0 < len(entry) < 64 * 1024
        wait_for(lambda: msgs.of("complete_job", job_id=job_id), message="complete_job")
        message = msgs.of("complete_job", job_id=job_id)[0]
        assert len(json.dumps(message)) < 64 * 1024
        stored = json.loads(entry)["data"]["data"]  # {"success", "data": the result {"data", "outputs", ...}}
        assert message["result"]["data"] == stored
        assert stored["stored_as_file"] is True and stored["mime_type"] == "application/json"
        assert len(json.load(open(stored["path"], encoding="utf-8"))["items"]) == 5 * 1024 * 1024 // 100
    finally:
        msgs.close()
        procs.close()


def test_a_large_result_is_prepared_while_the_heartbeat_renews_the_lease(site, client, redis_url, tmp_path):
    """Sizing a large result (C json.dumps holds the GIL whole, even in a thread) and walking it for blobs held
    the worker's loop: 26 MB of rows stopped the heartbeat 1.8 s, and a 1 s lease expired before the job was
    recorded (the reaper then ran it again elsewhere)."""
    procs = _edge(site, tmp_path, redis_url, lease="1s")
    built = tmp_path / "built"
    try:
        procs.start()
        procs.wait_up(client)
        job_id = JobStore(client).submit("edge", {"rows": 4_000_000, "built": str(built)})
        wait_for(built.exists, 30, interval=0.01, message="the connector built its result")
        renewals, last, ended = [time.monotonic()], client.zscore("jobs:leases", job_id), None
        while ended is None:  # every lease renewal until the job is recorded
            score = client.zscore("jobs:leases", job_id)
            if score is None:
                ended = time.monotonic()
            elif score != last:
                renewals.append(time.monotonic())
                last = score
            assert time.monotonic() - renewals[0] < 60, "the job did not end"
            time.sleep(0.01)
        assert status_of(client, job_id) == "completed"
        gaps = [b - a for a, b in zip(renewals, [*renewals[1:], ended])]
        assert max(gaps) < 0.9, f"the 1 s lease went unrenewed for {max(gaps):.2f} s: {gaps}"
        assert "job.lost" not in procs.log(0)
    finally:
        procs.close()


# -- 6. progress messages ---------------------------------------------------------------------------------
def test_a_huge_progress_message_is_cut_to_a_few_kilobytes(site, client, redis_url, tmp_path):
    from emp_machine.runtime.worker import PROGRESS_MESSAGE_MAX

    procs = _edge(site, tmp_path, redis_url)
    msgs = Messages(client, "update_job_progress")
    try:
        procs.start()
        procs.wait_up(client)
        job_id = JobStore(client).submit("edge", {"progress_kb": 1024})  # a 1 MB message
        wait_for(lambda: status_of(client, job_id) == "completed", 20, message="the job completed")
        wait_for(lambda: any(m.get("progress") == 50 for m in msgs.of("update_job_progress", job_id=job_id)),
                 message="the 50 % progress message")
        sent = next(m for m in msgs.of("update_job_progress", job_id=job_id) if m.get("progress") == 50)
        assert len(sent["message"]) == PROGRESS_MESSAGE_MAX and sent["message"].endswith("… [truncated]")
    finally:
        msgs.close()
        procs.close()


def test_a_platform_drain_time_shorter_than_stop_grace_hands_the_job_back_within_it(client, redis_url, tmp_path):
    # `docker stop` kills 10 s after its SIGTERM: a worker with stop_grace 60 s was still running its job at
    # the SIGKILL (handed back only when its lease expired). EMP_DRAIN_SECONDS (or Railway's
    # RAILWAY_DEPLOYMENT_DRAINING_SECONDS) bounds the drain.
    body = "workers:\n  sim:\n    connector: simulation\n    job_types: [drainsim]\n    stop_grace: 60s\n"
    procs = WorkerProcs(body, tmp_path / "d", redis_url, machine_id=f"dr{uuid.uuid4().hex[:6]}",
                        environ={"EMP_DRAIN_SECONDS": "3"})
    try:
        procs.start()
        procs.wait_up(client)
        job_id = JobStore(client).submit("drainsim", {"steps": 1, "step_ms": 0, "hang": True})
        wait_for(lambda: status_of(client, job_id) == "in_progress", message="the job running")
        sent = time.monotonic()
        procs.signal(0, signal.SIGTERM)
        assert procs.wait_exit(0, timeout=30) == 0
        took = time.monotonic() - sent
        assert took < 3.0, took  # within the platform's 3 s, not the manifest's 60 s
        assert status_of(client, job_id) == "pending" and client.hget(f"job:{job_id}", "retry_count") == "0"
    finally:
        procs.close()

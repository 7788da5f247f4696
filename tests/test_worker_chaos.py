"""Workers dying, stopping and losing Redis: SIGKILL + lease + reaper, drain on SIGTERM, 500 jobs through 4
workers SIGKILLed at random under a real supervisord, a Redis restart mid-run, and a connector misbehaving
(its own CancelledError, SystemExit, a slow cancel(), a large inline result). Real processes only."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.redis_server import PrivateRedis, free_port
from _helpers import install_plugin, sitecustomize_env
from harness import Messages, WorkerProcs, wait_for


def status_of(client, job_id):
    return client.hget(f"job:{job_id}", "status")


def wait_status(client, job_id, *statuses, timeout=10.0):
    return wait_for(lambda: status_of(client, job_id) in statuses, timeout,
                    message=f"job {job_id} to reach {statuses} (now {status_of(client, job_id)})")


def _sim_workers(count: int, setting: str = "") -> str:
    """A manifest with `count` simulation workers and one optional group setting (e.g. `lease: 2s`)."""
    return f"workers:\n  sim:\n    connector: simulation\n    count: {count}\n" + (f"    {setting}\n" if setting else "")


def stuck_cli(url):
    out = subprocess.run([sys.executable, "-m", "emp_machine", "stuck", "--json", "--redis", url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_sigkilled_worker_job_is_stuck_then_reaped_and_run_by_another(redis, redis_url, tmp_path):
    procs = WorkerProcs(_sim_workers(2, "lease: 2s"), tmp_path, redis_url)
    store = JobStore(redis)
    try:
        procs.start(0)  # one worker only: nobody reaps while we look at the stuck job
        procs.wait_up(redis, 0)
        job_id = store.submit("simulation", {"steps": 1, "step_ms": 0, "hang": True})
        wait_status(redis, job_id, "in_progress")
        first = procs.ids[0]
        assert redis.hget(f"job:{job_id}", "worker_id") == first
        assert stuck_cli(redis_url) == []
        procs.signal(0, signal.SIGKILL)
        procs.wait_exit(0)

        rows = wait_for(lambda: stuck_cli(redis_url), timeout=10, message="the job to show as stuck")
        assert [(r["job_id"], r["worker_id"], r["status"]) for r in rows] == [(job_id, first, "in_progress")]
        assert rows[0]["lease_expired"] is True and "lease expired" in rows[0]["reason"]
        assert status_of(redis, job_id) == "in_progress"  # nobody reaped it yet

        redis.hset(f"job:{job_id}", "payload", json.dumps({"steps": 1, "step_ms": 0}))  # let the rerun end
        procs.start(1)
        wait_status(redis, job_id, "completed", timeout=15)
        job = redis.hgetall(f"job:{job_id}")
        assert job["worker_id"] == procs.ids[1] and job["retry_count"] == "0"
        evs = [(e["ev"], e.get("worker_id")) for e in store.timeline(job_id).events]
        assert evs == [("submitted", None), ("claimed", first), ("started", first), ("lease_expired", first),
                       ("claimed", procs.ids[1]), ("started", procs.ids[1]), ("completed", procs.ids[1])]
        assert stuck_cli(redis_url) == []
        assert not redis.hexists(f"jobs:active:{first}", job_id)
    finally:
        procs.close()


def test_sigterm_drain_hands_back_a_long_job_and_finishes_a_short_one(redis, redis_url, tmp_path):
    procs = WorkerProcs(_sim_workers(2, "stop_grace: 2s"), tmp_path, redis_url)
    store = JobStore(redis)
    msgs = Messages(redis, "job_failed", "job_requeued", "complete_job")
    try:
        procs.start()
        procs.wait_up(redis)
        long_job = store.submit("simulation", {"steps": 1, "step_ms": 0, "hang": True})
        wait_status(redis, long_job, "in_progress")
        short_job = store.submit("simulation", {"steps": 3, "step_ms": 150})
        wait_status(redis, short_job, "in_progress")
        by_worker = {redis.hget(f"job:{j}", "worker_id"): j for j in (long_job, short_job)}
        assert set(by_worker) == set(procs.ids)

        sent = time.monotonic()
        for i in (0, 1):
            procs.signal(i, signal.SIGTERM)
        wait_for(lambda: procs.log(0).count("worker.draining") + procs.log(1).count("worker.draining") >= 1,
                 message="a worker to drain")
        late = store.submit("simulation", {"steps": 1, "step_ms": 0})  # a draining worker claims nothing
        assert procs.wait_exit(0) == 0 and procs.wait_exit(1) == 0
        took = time.monotonic() - sent
        assert took < 2.0, took  # handed back inside stop_grace: supervisord's SIGKILL never needed

        assert status_of(redis, short_job) == "completed"
        job = redis.hgetall(f"job:{long_job}")
        assert (job["status"], job["retry_count"], job["worker_id"]) == ("pending", "0", "")
        assert redis.zscore("jobs:pending", long_job) is not None
        assert [e["ev"] for e in store.timeline(long_job).events][-1] == "handed_back"
        assert not msgs.of("job_failed", job_id=long_job)  # no attempt counted, nothing announced as failed
        assert msgs.of("job_requeued", job_id=long_job, reason="drain")
        assert status_of(redis, late) == "pending"
        for wid in procs.ids:
            assert redis.hget(f"worker:{wid}", "status") == "offline"
            assert not redis.exists(f"worker:{wid}:heartbeat") and not redis.hlen(f"jobs:active:{wid}")
    finally:
        msgs.close()
        procs.close()


def test_an_idle_worker_stops_waiting_for_jobs_when_it_drains(redis, redis_url, tmp_path):
    # Idle, the claim loop waits on the job wake-up for up to FALLBACK_SWEEP_S; SIGTERM interrupts that wait.
    from emp_machine.runtime.worker import FALLBACK_SWEEP_S

    procs = WorkerProcs(_sim_workers(1), tmp_path, redis_url)
    try:
        procs.start()
        procs.wait_up(redis)
        wait_for(lambda: redis.hget(f"worker:{procs.ids[0]}", "status") == "idle", message="the worker idle")
        sent = time.monotonic()
        procs.signal(0, signal.SIGTERM)
        assert procs.wait_exit(0) == 0
        assert time.monotonic() - sent < FALLBACK_SWEEP_S  # not left waiting out the idle sweep
        assert redis.hget(f"worker:{procs.ids[0]}", "status") == "offline"
    finally:
        procs.close()


def test_an_exit_leaves_a_same_id_successor_alone(redis):
    # Two live processes can hold one worker id: a machine booted with the id of one that was SIGKILLed
    # while the old one's orphans still drain. The old one's exit (offline) wrote offline and deleted the
    # heartbeat key over the live new worker (seen 1 run in 4). Each registration carries its own token now.
    store = JobStore(redis)
    msgs = Messages(redis, "worker_status")
    try:
        store.register_worker("w-dup", "m-old", {"services": ["simulation"]}, instance="old-process")
        store.register_worker("w-dup", "m-new", {"services": ["simulation"]}, instance="new-process")
        store.set_worker_status("w-dup", "busy", "job-1")  # the new process runs a job

        assert store.set_worker_status("w-dup", "offline", instance="old-process") == "busy"
        worker = redis.hgetall("worker:w-dup")
        assert (worker["status"], worker["current_job_id"], worker["machine_id"], worker["instance"]) == \
            ("busy", "job-1", "m-new", "new-process")
        assert redis.ttl("worker:w-dup:heartbeat") > 0

        # the normal case: the process that registered last goes offline
        assert store.set_worker_status("w-dup", "offline", instance="new-process") == "busy"
        assert redis.hget("worker:w-dup", "status") == "offline" and not redis.exists("worker:w-dup:heartbeat")
        wait_for(lambda: msgs.of("worker_status", worker_id="w-dup", new_status="offline"),
                 message="worker_status offline")
        # pub/sub keeps order: had the old process's exit published, its message would be here by now
        assert len(msgs.of("worker_status", worker_id="w-dup", new_status="offline")) == 1
        # without a token (the machine marking a dead worker), offline is written whoever registered
        store.register_worker("w-dup", "m-new", {"services": ["simulation"]}, instance="newest-process")
        store.set_worker_status("w-dup", "offline")
        assert redis.hget("worker:w-dup", "status") == "offline"
    finally:
        msgs.close()


def test_a_worker_process_exit_leaves_a_same_id_successor_registered(redis, redis_url, tmp_path):
    # The same through a real worker process: its offline write carries the token it registered with.
    procs = WorkerProcs(_sim_workers(1), tmp_path, redis_url)
    try:
        procs.start()
        procs.wait_up(redis)
        wid = procs.ids[0]
        first = wait_for(lambda: redis.hget(f"worker:{wid}", "instance"), message="the worker's token")
        JobStore(redis).register_worker(wid, "successor", {"services": ["simulation"]}, {"x": {"status": "active"}},
                                        instance="successor")
        procs.signal(0, signal.SIGTERM)
        assert procs.wait_exit(0) == 0
        worker = redis.hgetall(f"worker:{wid}")
        assert (worker["status"], worker["machine_id"], worker["instance"]) == ("idle", "successor", "successor")
        assert json.loads(worker["connector_statuses"]) == {"x": {"status": "active"}}
        assert redis.exists(f"worker:{wid}:heartbeat") and first != "successor"

        procs.start(0)  # a process that registered last goes offline on its exit, as always
        wait_for(lambda: sum('"worker.spawned"' in line for line in procs.log(0).splitlines()) == 2, 20,
                 message="the new process up")
        procs.signal(0, signal.SIGTERM)
        assert procs.wait_exit(0) == 0
        assert redis.hget(f"worker:{wid}", "status") == "offline" and not redis.exists(f"worker:{wid}:heartbeat")
    finally:
        procs.close()


def test_a_worker_started_while_redis_is_unreachable_stops_on_sigterm(tmp_path):
    # Start-up waits out a Redis outage however long it lasts; it used to ignore SIGTERM meanwhile, so
    # supervisord had to SIGKILL it, and if Redis came back first it registered a worker told to stop.
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    procs = WorkerProcs(_sim_workers(1), tmp_path, nowhere)
    try:
        procs.start()
        wait_for(lambda: "Redis unreachable at start" in procs.log(0), 20, message="start-up retrying")
        procs.signal(0, signal.SIGTERM)
        assert procs.wait_exit(0, timeout=10) == 0  # it used to retry until Redis came back: never, here
        log = procs.log(0)
        assert "worker stopped before start-up finished" in log and '"worker.spawned"' not in log
    finally:
        procs.close()


def test_a_worker_stopped_once_registered_but_before_its_start_up_ended_goes_offline(tmp_path, redis, redis_url):
    # A stop in the few milliseconds after the registration (a machine stopped just as it booted) ended
    # start-up with no offline write: `worker:{id}` read idle, its heartbeat key alive, and the stopping machine
    # does not correct it. Injected (a sitecustomize on the worker's PYTHONPATH): the first heartbeat after the
    # registration sends the worker its own SIGTERM and never answers.
    env = sitecustomize_env(tmp_path / "inject",
                            "import asyncio, os, signal\n"
                            "from emp_machine.runtime import jobs\n"
                            "async def _stop_here(self, *args, **kwargs):\n"
                            "    os.kill(os.getpid(), signal.SIGTERM)\n"
                            "    await asyncio.Event().wait()\n"
                            "jobs.AsyncJobStore.heartbeat = _stop_here\n")
    procs = WorkerProcs(_sim_workers(1), tmp_path / "state", redis_url, environ=env)
    try:
        procs.start()
        assert procs.wait_exit(0, timeout=20) == 0, procs.log(0)
        wid = procs.ids[0]
        assert "worker stopped before start-up finished" in procs.log(0), procs.log(0)
        worker = redis.hgetall(f"worker:{wid}")
        assert worker.get("instance"), worker  # it had registered
        assert worker["status"] == "offline" and not redis.exists(f"worker:{wid}:heartbeat"), worker
    finally:
        procs.close()


def test_500_jobs_through_4_workers_sigkilled_at_random(machine_factory, redis, redis_url):
    machine = machine_factory("""
workers:
  sim:
    connector: simulation
    count: 4
    lease: 2s
    stop_grace: 2s
    restart: {backoff_initial: 0s, max_restarts: 100, reset_after: 0s}
""")
    machine.wait_ready()
    names = [f"worker-{i}" for i in range(4)]
    for name in names:
        wait_for(lambda: '"worker.spawned"' in machine.log_of(name), timeout=20, message=f"{name} up")
    store = JobStore(redis)
    msgs = Messages(redis, "complete_job")
    rng = random.Random(4)
    ids = [store.submit("simulation", {"steps": 2, "step_ms": rng.choice((0, 5, 20))}) for _ in range(500)]
    kills = 0
    deadline = time.monotonic() + 50
    try:
        while kills < 12 and time.monotonic() < deadline:
            row = machine.process(rng.choice(names))
            if row is not None and row.state == "RUNNING" and row.pid:
                try:
                    os.kill(row.pid, signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            # pace the kills by work done, not by a clock: one kill per ~30 completions
            done_before = len(msgs.seen)
            wait_for(lambda: len(msgs.seen) >= min(500, done_before + 30) or redis.zcard("jobs:pending") == 0,
                     timeout=30, message="progress between kills")
        pipe = redis.pipeline()

        def all_done():
            for j in ids:
                pipe.hget(f"job:{j}", "status")
            return all(s == "completed" for s in pipe.execute())

        wait_for(all_done, timeout=max(5.0, deadline - time.monotonic()), interval=0.2,
                 message="all 500 jobs completed")
    finally:
        msgs.close()
    completions = collections.Counter(m["job_id"] for m in msgs.of("complete_job"))
    starts = collections.Counter()
    for j in ids:
        starts[j] = sum(1 for e in store.timeline(j).events if e["ev"] == "started")
    duplicates = sum(n - 1 for n in starts.values() if n > 1)
    print(f"\n500 jobs, 4 workers, {kills} SIGKILLs: {duplicates} duplicate runs "
          f"({sum(1 for n in starts.values() if n > 1)} jobs started more than once), none lost")
    assert kills >= 6
    assert set(completions) == set(ids) and max(completions.values()) == 1  # each completed exactly once
    assert all(redis.hget(f"job:{j}", "retry_count") == "0" for j in ids)  # a kill is not a failed attempt
    assert redis.zcard("jobs:pending") == 0 and not any(redis.hlen(k) for k in redis.keys("jobs:active:*"))


def test_redis_restarted_mid_run_workers_reconnect_and_carry_on(tmp_path):
    port = free_port()
    server = PrivateRedis(tmp_path / "redis").start(port)
    client = redis_lib.Redis(port=port, decode_responses=True)
    procs = WorkerProcs(_sim_workers(2, "lease: 3s"), tmp_path / "w", server.url)
    try:
        procs.start()
        procs.wait_up(client)
        store = JobStore(client)
        before = [store.submit("simulation", {"steps": 2, "step_ms": 20}) for _ in range(60)]
        wait_for(lambda: sum(status_of(client, j) == "completed" for j in before) >= 10,
                 message="some jobs done before the restart")
        # a restart that keeps the data (as a persistent Redis does): SAVE, stop, load it again on start.
        # Writes between the SAVE and the stop are lost, as with any snapshot: those jobs run again.
        client.save()
        server.stop()
        # The outage itself (not a synchronisation), longer than the 3 s lease: finishing writes retried
        # across it land when they started late enough, and the others give up and the job runs again.
        time.sleep(3.5)
        server.start(port)
        client = redis_lib.Redis(port=port, decode_responses=True)
        store = JobStore(client)
        after = [store.submit("simulation", {"steps": 1, "step_ms": 0}) for _ in range(20)]
        for j in before + after:
            wait_status(client, j, "completed", "failed", timeout=20)
        assert [status_of(client, j) for j in before + after] == ["completed"] * 80  # an outage fails nothing
        assert all(p.poll() is None for p in procs.procs.values())

        # and a restart that loses everything: the workers register again and serve new jobs
        server.stop()
        server.start(port)
        client = redis_lib.Redis(port=port, decode_responses=True)
        for wid in procs.ids:
            wait_for(lambda: client.hget(f"worker:{wid}", "capabilities"), timeout=10,
                     message=f"{wid} to register again")
        store = JobStore(client)
        fresh = [store.submit("simulation", {"steps": 1, "step_ms": 0}) for _ in range(10)]
        for j in fresh:
            wait_status(client, j, "completed", timeout=20)
    finally:
        procs.close()
        server.stop()


def test_a_worker_registers_again_at_once_when_redis_is_flushed_or_comes_back_empty(tmp_path):
    """Audit BZ: with the default 60 s lease a worker beats every 20 s, and only the beat looked for its
    registration: after a FLUSHALL or an empty restart the machine saw no heartbeat (/health 503) for up to
    20 s while the worker ran jobs. A job whose hash vanished now makes it look at once, as does its
    subscription coming back; and that job is said to have vanished (a WARNING), not to be "left to its new
    owner". Every step below ends well before the first beat, 20 s after the start."""
    port = free_port()
    server = PrivateRedis(tmp_path / "redis").start(port)
    client = redis_lib.Redis(port=port, decode_responses=True)
    procs = WorkerProcs(_sim_workers(1), tmp_path / "w", server.url)
    wid = procs.ids[0]

    def registered(c):
        return c.hget(f"worker:{wid}", "capabilities") and c.exists(f"worker:{wid}:heartbeat")

    try:
        procs.start()
        procs.wait_up(client)
        job_id = JobStore(client).submit("simulation", {"steps": 400, "step_ms": 50})  # 20 s of progress
        wait_status(client, job_id, "in_progress")
        client.flushall()  # the job's hash and the worker's registration with it
        wait_for(lambda: registered(client), timeout=8, message=f"{wid} to register again\n{procs.log(0)[-2000:]}")
        wait_for(lambda: '"job.vanished"' in procs.log(0), timeout=8, message=procs.log(0)[-2000:])
        assert "left to its new owner" not in procs.log(0)
        assert not client.exists(f"job:{job_id}")  # nothing written for the vanished job
        wait_for(lambda: client.hget(f"worker:{wid}", "status") == "idle", timeout=8)

        server.stop()  # and an empty restart with the worker idle: its subscription comes back, and looks
        server.start(port)
        client = redis_lib.Redis(port=port, decode_responses=True)
        wait_for(lambda: registered(client), timeout=8, message=f"{wid} to register again\n{procs.log(0)[-2000:]}")
        assert procs.log(0).count('"worker.registration_lost"') >= 2  # (a beat in between may say it too)
    finally:
        procs.close()
        server.stop()


def test_a_vanished_jobs_end_leaves_the_worker_busy_with_its_next_job_then_idle(redis, redis_url, tmp_path):
    """Review of the fix above: the worker wrote idle/busy itself when a vanished job ended, and that write
    raced the next claim's busy (the worker shown idle while it ran the next job, then busy with the vanished
    one until a heartbeat, as it stayed in jobs:active). The job is now released by a script, atomically."""
    procs = WorkerProcs(_sim_workers(1), tmp_path, redis_url)  # default lease: no beat within this test
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        wid = procs.ids[0]
        gone = store.submit("simulation", {"steps": 400, "step_ms": 50})
        wait_status(redis, gone, "in_progress")
        following = store.submit("simulation", {"steps": 20, "step_ms": 100})  # waits for the slot
        redis.delete(f"job:{gone}")  # its next progress write finds the hash gone
        wait_status(redis, following, "in_progress")
        wait_for(lambda: redis.hmget(f"worker:{wid}", "status", "current_job_id") == ["busy", following],
                 timeout=5, message=f"busy with {following}: {redis.hgetall(f'worker:{wid}')}")
        wait_status(redis, following, "completed")
        wait_for(lambda: redis.hmget(f"worker:{wid}", "status", "current_job_id") == ["idle", ""]
                 and not redis.hlen(f"jobs:active:{wid}"), timeout=8,
                 message=f"idle, nothing active: {redis.hgetall(f'worker:{wid}')}")
    finally:
        procs.close()


def test_a_vanished_job_the_heartbeat_finds_is_said_to_have_vanished(redis, redis_url, tmp_path):
    """A job quiet when its hash goes (no progress to write) is found by the heartbeat's script ('missing'):
    logged as vanished too, not as "lost while running; left to its new owner"."""
    procs = WorkerProcs(_sim_workers(1, "lease: 3s"), tmp_path, redis_url)  # a beat a second
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        job_id = store.submit("simulation", {"steps": 1, "step_ms": 0, "hang": True})
        wait_status(redis, job_id, "in_progress")
        redis.delete(f"job:{job_id}")
        wait_for(lambda: '"job.vanished"' in procs.log(0), timeout=10, message=procs.log(0)[-2000:])
        assert "left to its new owner" not in procs.log(0)
    finally:
        procs.close()


def test_a_stray_in_a_workers_active_jobs_is_handed_back_at_its_second_sighting_not_its_first(redis, redis_url,
                                                                                               tmp_path):
    """A job in jobs:active for a worker that does not run it (a claim whose reply was lost) is handed back, but
    only once two heartbeats in a row saw it: at the first it may be a claim whose reply is still on its way,
    and handing that back ran the job twice (mutation audit M4). Counted in the server's own order (keyspace
    notifications on one subscription): the claim's write of jobs:active, then the beats (each sets the
    heartbeat key), then the hand-back's removal; at least two beats must come between."""
    procs = WorkerProcs(_sim_workers(1, "lease: 3s"), tmp_path, redis_url)  # a beat a second
    store = JobStore(redis)
    wid = procs.ids[0]
    redis.config_set("notify-keyspace-events", "Kh$")
    events = redis.pubsub(ignore_subscribe_messages=True)
    try:
        events.psubscribe(f"__keyspace@*__:worker:{wid}:heartbeat", f"__keyspace@*__:jobs:active:{wid}")
        procs.start()
        procs.wait_up(redis)
        # claimed under the worker's id by someone else: the worker never heard of it (the payload would hang)
        job_id = store.submit("other-type", {"steps": 1, "step_ms": 0, "hang": True})
        stray = store.claim({"worker_id": wid, "machine_id": "wt", "services": ["other-type"]}, start=True)
        assert stray is not None and stray.id == job_id
        seen: list[tuple[str, str]] = []

        def handed_back():
            while (msg := events.get_message(timeout=0.01)) is not None:
                seen.append(("active" if ":jobs:active:" in msg["channel"] else "beat", msg["data"]))
            return ("active", "hdel") in seen

        wait_for(handed_back, timeout=10, message=f"the stray handed back: {seen}\n{procs.log(0)[-2000:]}")
        claimed = seen.index(("active", "hset"))
        beats = seen[claimed:seen.index(("active", "hdel"), claimed)].count(("beat", "set"))
        assert beats >= 2, seen  # seen at one beat, handed back at the next
        assert "handed_back" in [e["ev"] for e in store.timeline(job_id).events]
        assert redis.hget(f"job:{job_id}", "status") == "pending"
    finally:
        events.close()
        redis.config_set("notify-keyspace-events", "")
        procs.close()


# -- a connector misbehaving: its own CancelledError, SystemExit, a slow cancel(), a large inline result ------

CHAOS = '''
import asyncio
import base64
import os

from emp_machine.connectors.base import Connector, JobResult


class ChaosConnector(Connector):
    name = "chaos"
    slow_cancel = set()

    async def cancel(self, job_id):
        if job_id in self.slow_cancel:
            await asyncio.sleep(4)  # a service whose cancel endpoint answers slowly

    async def run(self, job, progress):
        p = job.payload
        if p.get("slow_cancel"):
            self.slow_cancel.add(job.id)
        await asyncio.sleep(p.get("sleep_s", 0))
        mode = p.get("mode")
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "cancelled_error":  # an inner task it awaited was cancelled: CancelledError out of run()
            inner = asyncio.ensure_future(asyncio.sleep(3600))
            inner.cancel()
            await inner
        if mode == "system_exit":
            raise SystemExit(3)
        if mode == "blob":
            raw = os.urandom(p["mb"] << 20)
            return JobResult(data={"image": "data:image/png;base64," + base64.b64encode(raw).decode()})
        return JobResult(data={"mode": mode})
'''


@pytest.fixture(scope="module")
def chaos_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("chaos_site")
    install_plugin(site, "emp_chaos_", CHAOS, {"chaos": "ChaosConnector"})
    sys.path.insert(0, str(site))  # the manifest is validated here too, against installed connectors
    yield site
    sys.path.remove(str(site))


def chaos_workers(chaos_site, tmp_path, redis_url, settings: str) -> WorkerProcs:
    body = "workers:\n  chaos:\n    connector: chaos\n" + "".join(f"    {line}\n" for line in settings.split(";"))
    return WorkerProcs(body, tmp_path, redis_url, environ={"PYTHONPATH": str(chaos_site)})


def events_of(store, job_id):
    return [e["ev"] for e in store.timeline(job_id).events]


@pytest.mark.parametrize("mode, error", [("cancelled_error", "connector raised CancelledError: "),
                                         ("system_exit", "connector raised SystemExit: 3")])
def test_a_connectors_own_cancelled_error_or_system_exit_fails_its_job_alone(chaos_site, redis, redis_url,
                                                                             tmp_path, mode, error):
    # A CancelledError the connector raised itself was taken for a drain: the job went back uncounted and was
    # claimed again, forever (56 claims in 3 s). SystemExit from a plugin ended the worker.
    procs = chaos_workers(chaos_site, tmp_path, redis_url, "concurrency: 2;lease: 5s")
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        beside = store.submit("chaos", {"mode": "ok", "sleep_s": 1.0})
        wait_status(redis, beside, "in_progress")
        bad = store.submit("chaos", {"mode": mode}, max_retries=3)
        wait_status(redis, bad, "failed")
        job = redis.hgetall(f"job:{bad}")
        assert (job["error"], job["retry_count"]) == (error, "1")  # failed for good: a bug, not retryable
        assert events_of(store, bad) == ["submitted", "claimed", "started", "failed"]
        wait_status(redis, beside, "completed")
        assert procs.procs[0].poll() is None
    finally:
        procs.close()


def test_sigterm_hands_jobs_back_before_a_slow_connector_cancel_returns(chaos_site, redis, redis_url, tmp_path):
    # The hand-back used to await connector.cancel() (4 s here) first, past the drain's 2 s margin: at
    # supervisord's SIGKILL (stop_grace) the jobs were still claimed, until their lease expired.
    procs = chaos_workers(chaos_site, tmp_path, redis_url, "concurrency: 3;lease: 20s;stop_grace: 4s")
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        wid = procs.ids[0]
        jobs = [store.submit("chaos", {"mode": "hang", "slow_cancel": True}) for _ in range(3)]
        wait_for(lambda: redis.hlen(f"jobs:active:{wid}") == 3, message="three jobs running")
        procs.signal(0, signal.SIGTERM)
        try:  # as supervisord: SIGKILL at stopwaitsecs = stop_grace
            rc = procs.procs[0].wait(4.0)
        except subprocess.TimeoutExpired:
            procs.procs[0].kill()
            rc = procs.procs[0].wait()
        for job_id in jobs:
            job = redis.hgetall(f"job:{job_id}")
            assert (job["status"], job["retry_count"]) == ("pending", "0"), job
            assert events_of(store, job_id)[-1] == "handed_back"
            assert redis.zscore("jobs:pending", job_id) is not None
        assert not redis.hlen(f"jobs:active:{wid}")
        assert rc == 0  # and it exited by itself, before the SIGKILL
    finally:
        procs.close()


def test_a_worker_never_holds_more_claimed_jobs_than_its_concurrency_while_a_result_spills(chaos_site, redis,
                                                                                        redis_url, tmp_path):
    # The slot was freed when the connector returned, before the result's inline image was spilled to a
    # file: with concurrency 1 the next job was claimed and ran while the first was still not completed.
    procs = chaos_workers(chaos_site, tmp_path, redis_url, "concurrency: 1;lease: 10s")
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        blob = store.submit("chaos", {"mode": "blob", "mb": 64})
        after = store.submit("chaos", {"mode": "ok"})
        wait_status(redis, blob, "completed", timeout=60)
        wait_status(redis, after, "completed", timeout=20)
        (done,) = [e for e in store.timeline(blob).events if e["ev"] == "completed"]
        (claimed,) = [e for e in store.timeline(after).events if e["ev"] == "claimed"]
        assert done["steps"]["postprocessing"] > 100, done  # the spill took long enough to tell
        # Claimed once the first job's result was recorded: freeing the slot as its completion is sent lets
        # the two round trips overlap (jobs/s), so the claim may land a moment before the completion.
        assert claimed["t"] >= done["t"] - 50, (claimed, done)
    finally:
        procs.close()


def test_the_exit_does_not_wait_on_a_background_task_that_swallowed_its_cancellation():
    # redis-py can lose a cancellation that lands inside a call (the heartbeat then went on to its next
    # sleep): the exit's bare gather waited for it until supervisord's SIGKILL, and the offline write never
    # happened. Real asyncio tasks: one swallows its first cancellation, one ignores every cancellation.
    import asyncio

    from emp_machine.runtime.worker import cancel_and_wait

    async def swallows_once(log):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            log.append("swallowed")  # as a cancellation lost inside a Redis call
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            log.append("cancelled again")
            raise

    release = []

    async def never_ends(log):
        while not release:  # ignores every cancellation until released (at the end of the test)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                log.append("ignored")

    async def main():
        log: list[str] = []
        once = asyncio.create_task(swallows_once(log))
        await asyncio.sleep(0)
        started = time.monotonic()
        await cancel_and_wait([once], patience_s=5)
        first = (once.cancelled(), time.monotonic() - started)
        stuck = asyncio.create_task(never_ends(log))
        await asyncio.sleep(0)
        started = time.monotonic()
        await cancel_and_wait([stuck], patience_s=0.3)
        second = (stuck.done(), time.monotonic() - started)
        release.append(True)
        stuck.cancel()
        await asyncio.wait([stuck])
        return log, first, second

    log, (cancelled, took), (stuck_done, waited) = asyncio.run(main())
    assert cancelled and took < 1.0, (log, took)  # cancelled again at once, not after 30 s
    assert log[:2] == ["swallowed", "cancelled again"]
    assert not stuck_done and waited < 2.0  # left behind after its patience: the exit goes on

"""Health reporting tells the truth: a slow Redis is not "unreachable", a hung supervisord is not healthy, and
a crash restarted within one sweep is still a transition."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from types import SimpleNamespace

from emp_machine.runtime import hardware, plan
from emp_machine.runtime import manifest as mf
from emp_machine.runtime import status as st
from emp_machine.runtime.aggregate import Aggregator
from emp_machine.supervisor.control import ProcessInfo
from _helpers import TcpProxy, gated_listener
from harness import health_base, http, http_json, wait_for, wait_healthy

DELAY = 1.2  # every reply: slower than half the 2 s limit, so two queued round trips exceed it together


class DelayingProxy(TcpProxy):
    """A TCP proxy in front of the test Redis that holds every reply DELAY seconds (a slow, working Redis)."""

    async def _handle(self, cr, cw) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def up():
            while data := await cr.read(65536):
                uw.write(data)
            uw.close()

        async def down():
            queue: asyncio.Queue = asyncio.Queue()

            async def read():
                while data := await ur.read(65536):
                    queue.put_nowait((time.monotonic() + DELAY, data))
                queue.put_nowait(None)

            reader = asyncio.ensure_future(read())
            while (item := await queue.get()) is not None:
                await asyncio.sleep(max(0.0, item[0] - time.monotonic()))
                cw.write(item[1])
            await reader
            cw.close()

        await asyncio.gather(up(), down(), return_exceptions=True)


def test_a_slow_redis_shared_by_poller_and_publisher_is_not_reported_unreachable(redis_server, redis):
    """Each reply takes 1.2 s. The publisher's round trip and the poller's queue on one connection: the 2 s
    limit counts each caller's own round trip only, so both succeed (it used to time out the one waiting)."""
    proxy = DelayingProxy(redis_server.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("machine:status:slow")
    wait_for(lambda: pubsub.get_message(timeout=0.05) is None and pubsub.subscribed, 5, message="subscribed")

    async def scenario():
        client = st.redis_client(url)
        await client.ping()  # connection open (a slow PING), so both calls below are round trips only
        fake_agg = SimpleNamespace(plan=SimpleNamespace(machine_id="slow"),
                                   message=lambda kind, phase=None: {"update_type": kind})
        publisher = st.Publisher(fake_agg, client, url, 10.0)
        inbox: asyncio.Queue = asyncio.Queue()
        publishing = asyncio.create_task(publisher.publish("periodic"))  # holds the connection first
        await asyncio.sleep(0)
        poller = asyncio.create_task(st.poll_redis(client, url, [], inbox))  # queues behind it
        try:
            polled = await asyncio.wait_for(inbox.get(), 10)
            published = await publishing
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await client.aclose()
        return polled, published

    try:
        polled, published = asyncio.run(scenario())
        assert polled.ok, polled.reason
        assert published
        got = wait_for(lambda: pubsub.get_message(timeout=0.1), 5, message="the status message in Redis")
        assert json.loads(got["data"]) == {"update_type": "periodic"}
    finally:
        pubsub.close()
        proxy.close()


def test_a_hung_supervisord_is_reported_unhealthy_and_recovers(machine_factory, redis_url, redis):
    """supervisord SIGSTOPped: /health says the supervisor component does not answer and shows the processes
    as unknown, an event_driven message goes out; after SIGCONT it is healthy again."""
    events = redis.pubsub(ignore_subscribe_messages=True)
    events.psubscribe("machine:status:*")
    machine = machine_factory("""
status: {interval: 30s}
workers:
  sim:
    connector: simulation
    count: 1
""")
    machine.wait_ready()
    base = health_base(machine)
    wait_for(lambda: http_json(base + "/health")[0] == 200, 20, message="healthy")
    sup_pid = int((machine.state_dir / "run" / "supervisord.pid").read_text())
    seen: list[dict] = []

    def drain():
        while (m := events.get_message(timeout=0.01)) is not None:
            if m["type"] == "pmessage":
                seen.append(json.loads(m["data"]))
        return seen

    stopped_ms = time.time() * 1000  # the messages of the boot (a worker not registered yet reads offline there)
    os.kill(sup_pid, signal.SIGSTOP)
    try:
        def hung():
            code, body = http_json(base + "/health")
            sup = body["components"]["supervisor"]
            return code == 503 and not sup["healthy"] and sup["reason"].startswith("supervisord not answering") \
                and body
        body = wait_for(hung, 10, message="/health reporting the hung supervisord")
        assert body["services"]["worker-0"]["state"] == "unknown", body["services"]
        def sent_while_hung(m: dict) -> bool:
            return m["timestamp"] >= stopped_ms and m["update_type"] == "event_driven" and all(
                s["pm2_status"] != "online" for s in m["status"]["services"].values())
        wait_for(lambda: any(sent_while_hung(m) for m in drain()), 10,
                 message="an event_driven message without the stale online")
        # the worker runs and beats all along: its own state in Redis, not offline (supervisord says nothing)
        hung = next(m for m in seen if sent_while_hung(m))
        (worker,) = hung["status"]["workers"].values()
        assert worker["status"] == "idle" and worker["is_connected"], worker
        assert machine.event("supervisord.not_answering"), machine.tail()
    finally:
        os.kill(sup_pid, signal.SIGCONT)
    wait_for(lambda: http_json(base + "/health")[0] == 200 and http_json(base + "/health")[1]["components"][
        "supervisor"]["healthy"], 20, message="healthy again once supervisord answers")
    assert machine.event("supervisord.answering"), machine.tail()
    events.close()


def test_workers_whose_start_a_stalled_supervisord_left_unanswered_still_make_the_machine_ready(
        machine_factory, tmp_path):
    """The gate service turns healthy while supervisord is stopped: the machine asks it to start 8 workers, and
    each call times out (10 s): process.start_failed. supervisord then carries the starts out. Nothing counted
    those workers: the machine stayed `starting` for good (/ready 503) with every worker running. And the
    starts waited in asyncio's default pool (6 threads on 2 cores), where /metrics and the sweep wait too:
    /metrics hung until supervisord answered."""
    from emp_machine.runtime.redis_server import free_port

    gate, script = gated_listener(tmp_path)
    port = free_port()
    machine = machine_factory(f"""
services:
  gate:
    command: {sys.executable} {script} {{port}}
    port: {port}
    health: {{tcp: "{{port}}", interval: 100ms, start_period: 60s}}
workers:
  sim:
    connector: simulation
    service: gate
    count: 8
""")
    wait_for(lambda: (p := machine.process("gate-0")) and p.state == "RUNNING", 40, message="the gate running")
    base = health_base(machine)
    sup_pid = int((machine.state_dir / "run" / "supervisord.pid").read_text())
    os.kill(sup_pid, signal.SIGSTOP)
    try:
        gate.write_text("go")
        wait_for(lambda: machine.event("service.healthy", process_name="gate-0"), 10, message="the gate healthy")
        # the 8 starts are asked for at once and each waits up to 10 s: /metrics, asked meanwhile, must answer
        end = time.monotonic() + 4
        while time.monotonic() < end:
            asked = time.monotonic()
            code, _, _ = http(base + "/metrics", timeout=20)
            assert code == 200 and time.monotonic() - asked < 3, "/metrics waited behind the stalled starts"
        wait_for(lambda: machine.event("process.start_failed"), 20, message="a start timing out")
    finally:
        os.kill(sup_pid, signal.SIGCONT)
    machine.wait_ready(timeout=40)
    wait_for(lambda: http_json(base + "/ready") == (200, {"ready": True, "phase": "ready"}), 10, message="/ready 200")


def _row(name: str, pid: int, restarts: int) -> ProcessInfo:
    now = int(time.time())
    return ProcessInfo(name=name, state="RUNNING", pid=pid, start=now - 5, now=now, restarts=restarts,
                       exit_status=None, errored_reason="", restart_in=None, description="")


def test_a_crash_restarted_within_one_sweep_is_a_transition(tmp_path):
    """Two sweeps both see RUNNING, but the pid and restart count changed in between (a crash supervisord
    restarted at once): the aggregator flags a transition, so an event_driven message tells the monitor."""
    manifest = mf.loads(f"machine: {{type: test, id: ct, state_dir: {tmp_path / 'state'}}}\n"
                        "redis: {url: 'redis://127.0.0.1:1'}\n"
                        "workers: {sim: {connector: simulation, count: 1}}\n", environ={})
    the_plan = plan.build(manifest, hardware.probe(), resolved_manifest=tmp_path / "manifest.json", environ={})

    async def scenario():
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        names = [s.name for s in the_plan.specs]
        agg.set_processes(tuple(_row(n, 100 + i, 0) for i, n in enumerate(names)))
        agg.commit()
        agg.transition.clear()
        agg.set_processes(tuple(_row(n, 100 + i, 0) for i, n in enumerate(names)))
        agg.commit()
        assert not agg.transition.is_set(), "the same table again is no transition"
        agg.set_processes(tuple(_row(n, 900 + i, 1) for i, n in enumerate(names)))
        agg.commit()
        return agg.transition.is_set()

    assert asyncio.run(scenario()), "a restarted worker (new pid, restarts + 1) must be a transition"


def test_a_stalled_worker_is_unhealthy_past_its_lease_and_its_job_is_reaped_by_the_machine(
        machine_factory, tmp_path):
    """A worker SIGSTOPped mid-job on a one-worker machine, lease 3 s. Its heartbeat key lives the contract's 60 s
    whatever the lease, so /health stayed 200 for a minute; and only workers reaped, so no one re-queued the job
    (it stayed in_progress for good). Now /health says so once the heartbeat is older than the lease, and the
    machine's own reaper puts the job back. A Redis of its own: the reaping must be this machine's, and any
    other test's worker on the shared one would reap too."""
    import redis as redis_lib

    from emp_machine.runtime.redis_server import PrivateRedis

    private = PrivateRedis(tmp_path / "redis").start()
    redis = redis_lib.Redis.from_url(private.url, decode_responses=True)
    machine = machine_factory("""
workers:
  stall:
    connector: simulation
    job_types: [stallmachine]
    count: 1
    lease: 3s
    stop_grace: 2s
""", redis_url=private.url)
    try:
        _stall_and_recover(machine, redis)
    finally:
        machine.close()
        redis.close()
        private.stop()


def _stall_and_recover(machine, redis) -> None:
    from emp_machine.runtime.jobs import JobStore

    machine.wait_ready()
    base = health_base(machine)
    wait_for(lambda: http_json(base + "/health")[0] == 200, 20, message="healthy")
    store = JobStore(redis)
    job_id = store.submit("stallmachine", {"steps": 1, "step_ms": 0, "hang": True})
    wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "in_progress", 10, message="the job running")
    pid = machine.process("worker-0").pid
    os.kill(pid, signal.SIGSTOP)
    try:
        def stale():
            code, body = http_json(base + "/health")
            reason = body["services"]["worker-0"].get("reason", "")
            return code == 503 and "past its 3s lease" in reason and body
        wait_for(stale, 12, message="/health reporting the stalled worker")
        # lease 3 s, a confirmation of 1.5 s, the reaper's round (0.75 s): well within 15 s
        wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "pending", 15, message="the job re-queued")
        # by this machine (the only reaper on this Redis), which logs it just after the script returns
        wait_for(lambda: machine.event("jobs.requeued"), 5, message="the machine's jobs.requeued")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_healthy(base, 30, message="healthy again once it beats")  # (it failed once under a loaded machine)


def test_the_machines_reaper_sends_its_script_once(redis_server, redis):
    """EVALSHA after the first round: the ~39 KB script went with every round (52 KB/s a machine with 3 s
    leases, on the connection the poller and the publisher share)."""
    from emp_machine.runtime import jobs
    from emp_machine.runtime.resp import MiniRedis

    async def rounds():
        client = MiniRedis(redis_server.url)
        try:
            for _ in range(3):
                assert await jobs.reap_with(client, 3.0) == []
        finally:
            await client.aclose()
    redis.script_flush()
    redis.config_resetstat()
    asyncio.run(rounds())
    stats = redis.info("commandstats")
    assert stats.get("cmdstat_eval", {}).get("calls") == 1, stats.get("cmdstat_eval")
    assert stats.get("cmdstat_evalsha", {}).get("calls") == 3, stats.get("cmdstat_evalsha")


def test_a_stop_just_after_supervisord_recovers_asks_it_rather_than_killing_it(machine_factory):
    """The sweep's `not answering` flag can be up to a sweep old: a stop right after a hung supervisord came back
    took it as still hung, stopped its processes directly and SIGKILLed it. The stop asks it first (2 s)."""
    machine = machine_factory("""
workers:
  sim:
    connector: simulation
    count: 1
""")
    machine.wait_ready()
    base = health_base(machine)
    sup_pid = int((machine.state_dir / "run" / "supervisord.pid").read_text())
    os.kill(sup_pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not http_json(base + "/health")[1]["components"]["supervisor"]["healthy"], 15,
                 message="/health reporting the hung supervisord")
    finally:
        os.kill(sup_pid, signal.SIGCONT)
    machine.signal(signal.SIGTERM)  # at once: the flag still says hung
    assert machine.wait_exit(40) == 0
    stopped = machine.event("shutdown.worker_stopped")
    assert stopped is not None and not stopped.get("direct"), stopped
    assert machine.event("shutdown.supervisord_not_answering") is None, machine.tail()


# -- rules of the aggregate no other test pinned (mutation audit M2), on the Aggregator itself ------------------

def _rules_plan(tmp_path):
    manifest = mf.loads(f"machine: {{type: test, id: ru, state_dir: {tmp_path / 'state'}}}\n"
                        "redis: {url: 'redis://127.0.0.1:1'}\n"
                        "services:\n"
                        "  svc: {command: sleep 600, port: 18777,\n"
                        "        health: {tcp: '{port}', interval: 200ms, start_period: 10m}}\n"
                        "  opt: {command: sleep 600, required: false}\n"
                        "  plain: {command: sleep 600}\n"
                        "workers: {sim: {connector: simulation, count: 2}}\n", environ={})
    return plan.build(manifest, hardware.probe(), resolved_manifest=tmp_path / "manifest.json", environ={})


def _running(the_plan, **states) -> tuple:
    return tuple(ProcessInfo(name=s.name, state=states.get(s.name.replace("-", "_"), "RUNNING"), pid=100 + i,
                             start=int(time.time()) - 5, now=int(time.time()), restarts=0, exit_status=None,
                             errored_reason="", restart_in=None, description="")
                 for i, s in enumerate(the_plan.specs))


def _idle_rows(the_plan):
    from emp_machine.runtime.jobs import WorkerRow

    return [WorkerRow(w.worker_id, "idle", "", "2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.000Z", 50_000)
            for w in the_plan.workers]


def test_ready_waits_for_the_boot_and_health_for_a_probed_services_first_pass(tmp_path):
    the_plan = _rules_plan(tmp_path)

    async def scenario():
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("starting", True)
        agg.set_redis(True, "", _idle_rows(the_plan))
        agg.set_processes(_running(the_plan))
        agg.commit()
        assert (agg.ready_code, json.loads(agg.ready_body)) == (503, {"ready": False, "phase": "starting"})
        # Ready (every worker started), but the probed service has never passed its check: a service no worker
        # waits for is not held back by the boot, and the machine must not say healthy for it meanwhile.
        agg.set_phase("ready", True)
        agg.commit()
        assert agg.ready_code == 200
        assert agg.health_code == 503
        assert json.loads(agg.health_body)["reasons"] == ["svc-0: health check not passed yet"]
        agg.set_health("svc-0", True, "")
        agg.commit()
        assert agg.health_code == 200, agg.health_body
        # a service supervisord is still starting (its startsecs not yet passed) is not healthy yet
        agg.set_processes(_running(the_plan, plain_0="STARTING"))
        agg.commit()
        assert agg.health_code == 503 and json.loads(agg.health_body)["reasons"] == ["plain-0: state starting"]
        # and one waiting out a restart backoff (a crash loop) is shown launching, never online
        agg.set_processes(_running(the_plan, plain_0="BACKOFF"))
        agg.commit()
        plain = json.loads(agg.health_body)["services"]["plain-0"]
        assert (agg.health_code, plain["status"], plain["healthy"]) == (503, "launching", False)
        agg.set_processes(_running(the_plan))
        # a service marked `required: false` that died leaves the machine healthy, and says so on its own line
        agg.set_processes(_running(the_plan, opt_0="FATAL"))
        agg.commit()
        doc = json.loads(agg.health_body)
        assert agg.health_code == 200 and doc["reasons"] == []
        assert (doc["services"]["opt-0"]["healthy"], doc["services"]["opt-0"]["required"]) == (False, False)
        # while Redis is unreachable no worker's heartbeat can be read: none is shown healthy or connected
        agg.set_redis(False, "PING failed")
        agg.commit()
        doc, status = json.loads(agg.health_body), json.loads(agg.status_body)
        assert agg.health_code == 503
        assert all(not w["healthy"] and "Redis unreachable" in w["reason"] for w in doc["workers"].values()), doc
        assert all(w["is_connected"] is False for w in status["status"]["workers"].values()), status

    asyncio.run(scenario())


def test_a_worker_finishing_its_job_through_a_stop_is_shown_busy_with_it(tmp_path):
    # A drain gives a running job its stop_grace, and supervisord shows the worker STOPPING meanwhile: the
    # status messages of the drain showed it offline with no job, and its service inactive and stopped, while
    # it went on sending the job's progress and then completed it. A stopping worker is shown as Redis says;
    # one that has said it is offline is shown so, with that reason.
    from emp_machine.runtime.jobs import WorkerRow

    the_plan = _rules_plan(tmp_path)
    busy, done = (w.worker_id for w in the_plan.workers)
    at = "2026-01-01T00:00:00.000Z"

    async def scenario():
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("draining", True)
        agg.set_redis(True, "", [WorkerRow(busy, "busy", "job-1", at, at, 50_000),
                                 WorkerRow(done, "offline", "", at, at, -2)])
        agg.set_processes(_running(the_plan, worker_0="STOPPING", worker_1="STOPPING", plain_0="STOPPING"))
        agg.commit()
        return json.loads(agg.status_body)["status"], json.loads(agg.health_body)

    status, health = asyncio.run(scenario())
    shown = status["workers"][busy]
    assert (shown["status"], shown["current_job_id"], shown["is_connected"]) == ("busy", "job-1", True), shown
    assert status["services"][f"{busy}.simulation"] == {"status": "active", "health": "healthy",
                                                         "pm2_status": "online"}
    shown = status["workers"][done]
    assert (shown["status"], shown["current_job_id"], shown["is_connected"]) == ("offline", "", False), shown
    assert health["workers"][done]["reason"] == "reports offline", health["workers"]
    assert health["workers"][busy]["healthy"] is True and "machine is draining" in health["reasons"]
    assert health["services"]["worker-0"]["status"] == "online"
    # a service being stopped is not: its check is no longer asked (helper-189: it read active, healthy, online)
    assert (health["services"]["plain-0"]["status"], health["services"]["plain-0"]["healthy"]) == ("stopped", False)


def test_a_worker_id_registered_by_another_process_is_not_shown_as_this_machines_worker(tmp_path):
    # A machine booted with the id of one killed a moment before (a new container of the same service) read
    # that one's dead workers' hashes and live heartbeat keys as its own: busy, connected, /health 200, for the
    # ~20 s its own workers took to take the ids over (helper-188). The token in worker:{id} (pid-random-
    # pidspace) tells: a worker is this machine's once the token names its process (the pid supervisord shows).
    from emp_machine.runtime.identity import pid_space
    from emp_machine.runtime.jobs import WorkerRow

    the_plan = _rules_plan(tmp_path)
    first, second = (w.worker_id for w in the_plan.workers)
    at = "2026-01-01T00:00:00.000Z"
    processes = _running(the_plan)
    pid_of = {p.name: p.pid for p in processes}
    tokens = {"own": f"{pid_of['worker-0']}-abcdef012345-{pid_space()}",
              "other pid": f"{pid_of['worker-0'] + 1000}-abcdef012345-{pid_space()}",
              "other container": f"{pid_of['worker-0']}-abcdef012345-0123456789ab",
              "no token": ""}

    async def shown(token: str):
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("ready", True)
        agg.set_processes(processes)
        agg.set_health("svc-0", True, "")
        agg.set_redis(True, "", [WorkerRow(first, "busy", "ghost-job", at, at, 50_000, instance=token),
                                 WorkerRow(second, "idle", "", at, at, 50_000,
                                           instance=f"{pid_of['worker-1']}-abcdef012345-{pid_space()}")])
        agg.commit()
        return json.loads(agg.health_body), json.loads(agg.status_body)["status"]["workers"][first]

    for case, token in tokens.items():
        health, status = asyncio.run(shown(token))
        if case in ("own", "no token"):
            assert health["workers"][first]["healthy"] and health["healthy"], (case, health)
            assert (status["status"], status["current_job_id"], status["is_connected"]) == ("busy", "ghost-job",
                                                                                              True), case
        else:
            assert not health["healthy"] and "not registered in Redis yet" in health["workers"][first]["reason"]
            assert (status["status"], status["current_job_id"], status["is_connected"]) == ("offline", "", False)
        assert health["workers"][second]["healthy"], (case, health)


def test_a_worker_that_says_it_registered_is_shown_so_before_the_next_poll(tmp_path):
    # At boot, and after supervisord restarted a worker: the last poll read no heartbeat key (or the dead
    # predecessor's token), and the worker's own worker_status (idle) was applied on top of it: shown not
    # connected, "no heartbeat" (helper-190: 8 boots in 10, for 0.4-0.7 s) or "another process's
    # registration" (helper-189), until the next poll.
    from emp_machine.runtime.identity import pid_space
    from emp_machine.runtime.jobs import WorkerRow

    the_plan = _rules_plan(tmp_path)
    first, second = (w.worker_id for w in the_plan.workers)
    processes = _running(the_plan)
    predecessor = f"{processes[0].pid + 1000}-abcdef012345-{pid_space()}"
    at = "2026-01-01T00:00:00.000Z"

    async def scenario():
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("ready", True)
        agg.set_processes(processes)
        agg.set_health("svc-0", True, "")
        agg.set_redis(True, "", [WorkerRow(first, "offline", "", at, at, -2, instance=predecessor),
                                 WorkerRow(second, "", "", "", "", -2)])
        agg.commit()
        before = json.loads(agg.health_body)["workers"]
        agg.set_worker_status(first, "idle", "", at)
        agg.set_worker_status(second, "idle", "", at)
        agg.commit()
        return before, json.loads(agg.health_body), json.loads(agg.status_body)["status"]["workers"]

    before, health, status = asyncio.run(scenario())
    assert not before[first]["healthy"] and not before[second]["healthy"]
    assert health["healthy"], health["reasons"]
    assert all(status[w]["is_connected"] and status[w]["status"] == "idle" for w in (first, second)), status


def test_a_worker_not_started_yet_has_its_service_health_unknown_not_unhealthy(tmp_path):
    # Redis answers a row (status "") for a worker that never registered: read as known, every boot's first
    # messages said its service unhealthy before anything had been checked (helper-190); the contract's word
    # for that is unknown.
    from emp_machine.runtime.jobs import WorkerRow

    the_plan = _rules_plan(tmp_path)

    async def scenario():
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("starting", True)
        agg.set_processes(tuple(p for p in _running(the_plan) if not p.name.startswith("worker-")))
        agg.set_redis(True, "", [WorkerRow(w.worker_id, "", "", "", "", -2) for w in the_plan.workers])
        agg.commit()
        return json.loads(agg.status_body)["status"]["services"]

    assert {s["health"] for s in asyncio.run(scenario()).values()} == {"unknown"}


def test_a_refresh_asked_for_while_the_ready_announcement_waits_does_not_replace_it(tmp_path):
    # A refresh request (RefreshRequested) landing between the phase's turn to ready and the publisher's take
    # must not turn the boot's one machine_ready into an event_driven (M2's unrun M23: that passed every test).
    the_plan = _rules_plan(tmp_path)

    async def scenario():
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("ready", True)
        agg.request_publish("event_driven")
        first = agg.take_kind()
        agg.request_publish("event_driven")
        return first, agg.take_kind()

    assert asyncio.run(scenario()) == ("machine_ready", "event_driven")


def test_a_machine_ready_that_could_not_be_published_goes_out_once_redis_answers(redis_server, tmp_path):
    # A Redis blip at boot must not cost the monitor the boot announcement: the publisher owes it and sends it
    # (not a periodic) at its next try. The publisher's connection is black-holed (bytes dropped, never
    # delivered later), so the announcement that did arrive is the one sent again.
    import redis as redis_lib

    from stall_proxy import StallProxy

    the_plan = _rules_plan(tmp_path)
    proxy = StallProxy("127.0.0.1", redis_server.port)
    listener = redis_lib.Redis.from_url(redis_server.url, decode_responses=True).pubsub()
    listener.subscribe(f"machine:status:{the_plan.machine_id}")

    async def scenario():
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("starting", True)
        agg.commit()
        publisher = st.Publisher(agg, st.redis_client(proxy.url), proxy.url, 0.3)
        task = asyncio.create_task(publisher.run())
        kinds: list[str] = []

        async def until(condition, what, timeout=10.0):
            deadline = time.monotonic() + timeout
            while not condition():
                while (msg := listener.get_message(timeout=0)) is not None:
                    if msg["type"] == "message":
                        kinds.append(json.loads(msg["data"])["update_type"])
                assert time.monotonic() < deadline, f"{what}: {kinds}"
                await asyncio.sleep(0.02)

        try:
            await until(lambda: publisher.published >= 1, "a first periodic message")
            proxy.cut()  # the open connection is dead from now on
            agg.set_phase("ready", True)
            agg.commit()
            await until(lambda: publisher.failed >= 1, "the machine_ready attempt to fail")
            await until(lambda: "machine_ready" in kinds, "machine_ready once Redis answers")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await publisher.client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        listener.close()
        proxy.close()


def test_nothing_follows_the_shutdown_message_once_the_publisher_is_closed(redis_server, tmp_path):
    # CI caught a machine_ready after the shutdown message: the machine cancelled its publisher as the phase
    # went ready, and Python 3.11's wait_for swallowed the cancellation (it landed as the wait for that very
    # transition ended), so the loop went on to announce the machine ready after it had said it stopped. Here
    # the publisher is closed, never cancelled, just after the transition it was woken for: it must end
    # without a word, and the shutdown message is the only one.
    import redis as redis_lib

    the_plan = _rules_plan(tmp_path)
    listener = redis_lib.Redis.from_url(redis_server.url, decode_responses=True).pubsub()
    listener.subscribe(f"machine:status:{the_plan.machine_id}")
    wait_for(lambda: listener.get_message(timeout=0.05) is None and listener.subscribed, 5, message="subscribed")

    async def scenario():
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("starting", True)
        agg.commit()
        agg.transition.clear()
        publisher = st.Publisher(agg, st.redis_client(redis_server.url), redis_server.url, 30.0)
        task = asyncio.create_task(publisher.run())
        try:
            await asyncio.sleep(0)  # run() waits for a transition
            agg.set_phase("ready", True)
            agg.commit()  # a machine_ready owed, and run() woken for it
            await asyncio.sleep(0)
            publisher.close()
            await asyncio.wait_for(asyncio.shield(task), 5)  # it ends by itself
            assert await publisher.publish("shutdown", phase="shutdown")
            return publisher.published
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await publisher.client.aclose()

    try:
        assert asyncio.run(scenario()) == 1
        kinds = []
        while "shutdown" not in kinds:
            msg = wait_for(lambda: listener.get_message(timeout=0.05), 5, message=f"the shutdown message: {kinds}")
            kinds.append(json.loads(msg["data"])["update_type"])
        assert kinds == ["shutdown"]
    finally:
        listener.close()


def _first_fall(interval: float, started) -> tuple[str, int]:
    """run_probe (retries: 3) against a real loopback HTTP endpoint that answers 200 once, then 503 for good:
    (the unhealthy verdict's reason, how many 503s had been answered when it landed). `started(process,
    answered)` gives the process's (pid, start) as run_probe asks, `answered` the endpoint's counts so far."""
    from aiohttp import web

    from emp_machine.runtime import probes
    from emp_machine.runtime.plan import Probe

    async def scenario():
        answered = {"ok": 0, "failed": 0}

        async def handle(request):
            if answered["ok"] == 0:
                answered["ok"] += 1
                return web.Response(text="ok")
            answered["failed"] += 1
            return web.Response(status=503)

        app = web.Application()
        app.router.add_get("/health", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        inbox: asyncio.Queue = asyncio.Queue()
        probe = Probe(f"http://127.0.0.1:{port}/health", None, interval, 2.0, 0.0, 3)
        task = asyncio.create_task(probes.run_probe("svc-0", probe, inbox, lambda p, h, r: (h, r),
                                                    lambda process: started(process, answered)))
        try:
            assert await asyncio.wait_for(inbox.get(), 10) == (True, "")
            healthy, reason = await asyncio.wait_for(inbox.get(), 10)
            assert healthy is False
            return reason, answered["failed"]  # read as the verdict lands: the next check is `interval` away
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()

    return asyncio.run(scenario())


def test_a_restarted_service_starts_its_count_of_failed_checks_afresh():
    # Two failed checks of the old process (under retries: 3), then a restart (a new pid): the new process is
    # judged on its own three failures, not on the old one's two plus one of its own (an M2 mutant the audit
    # did not run: keeping the count passed every health test).
    def started(process, answered):  # the process was restarted after the old one's second failed check
        return (1 if answered["failed"] < 2 else 2), time.time()

    _, failed = _first_fall(0.05, started)
    assert failed == 2 + 3


def test_a_service_is_unhealthy_after_exactly_its_retries_in_failed_checks():
    # `health.retries: 3`: the third failed check in a row is the verdict, not the fourth.
    reason, failed = _first_fall(0.2, lambda process, answered: (1, time.time()))
    assert "HTTP 503" in reason and failed == 3


def test_a_tcp_probe_cancelled_as_its_connect_completes_stops(monkeypatch):
    # The machine's shutdown cancels its probes. Python 3.11's wait_for swallowed a cancellation that landed as
    # the TCP check's connect completed, and the probe went on: once the drain stopped the service, it reported
    # it unhealthy (service.unhealthy in a clean stop; the shutdown message showed it so). The probe connects
    # for real to a real listener; its connect is only held at its end, so the cancellation lands as it ends.
    from emp_machine.runtime import probes
    from emp_machine.runtime.plan import Probe

    async def scenario():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        real_open = asyncio.open_connection
        connected, gate = asyncio.Event(), asyncio.Event()

        async def held_open(*args, **kwargs):
            conn = await real_open(*args, **kwargs)
            connected.set()
            await gate.wait()
            return conn

        monkeypatch.setattr(asyncio, "open_connection", held_open)
        probe = Probe(None, server.sockets[0].getsockname()[1], 0.05, 1.0, 0.0, 1)
        inbox: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(probes.run_probe("svc", probe, inbox, lambda p, h, r: (h, r),
                                                    lambda process: (1, time.time())))
        try:
            await asyncio.wait_for(connected.wait(), 5)
            gate.set()
            await asyncio.sleep(0)  # the connect's last step runs
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2)
            return bool(done) and task.cancelled()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()), "the probe went on checking after it was cancelled"

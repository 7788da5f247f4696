"""A slow or silently broken network path to Redis: a stall_proxy.StallProxy between real worker processes
and a real Redis black-holes connections (a dropped NAT entry) or holds every byte (a stalled link)."""

from __future__ import annotations

import signal
import socket
import time
import types

import pytest

from emp_machine.runtime import cli_ops, worker
from emp_machine.runtime.jobs import JobStore
from harness import WorkerProcs, wait_for
from stall_proxy import StallProxy


@pytest.fixture
def proxy(redis_server):
    px = StallProxy("127.0.0.1", redis_server.port)
    yield px
    px.close()


def _workers(tmp_path, url, machine_id, job_type, setting=""):
    body = (f"workers:\n  sim:\n    connector: simulation\n    job_types: [{job_type}]\n"
            + (f"    {setting}\n" if setting else ""))
    return WorkerProcs(body, tmp_path, url, machine_id=machine_id)


def _completes_in(redis, store, job_type, timeout=10.0):
    t = time.monotonic()
    job_id = store.submit(job_type, {"steps": 1, "step_ms": 0})
    wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "completed", timeout, interval=0.01,
             message=f"job {job_id} to complete (now {redis.hget(f'job:{job_id}', 'status')})")
    return time.monotonic() - t


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "unix:///tmp/redis.sock"])
def test_redis_clients_read_with_a_timeout_and_keepalive(url):
    """redis-py before 8 reads without a timeout: a black-holed connection froze the worker (no heartbeat, its
    job in_progress for ever) and `emp-machine stuck`. The values are set on the clients themselves."""
    sync_client = None
    try:
        sync_client = cli_ops._store(types.SimpleNamespace(redis=url))[0]
    except Exception:  # nothing listens there: the client was built before the PING failed
        pass
    clients = [worker.redis_client(url).connection_pool.connection_kwargs]
    if sync_client is not None:
        clients.append(sync_client.connection_pool.connection_kwargs)
    for kwargs in clients:
        assert kwargs["socket_timeout"] == 5
        assert kwargs["socket_connect_timeout"] == 5
        if url.startswith("unix:"):  # refused by redis-py's unix connection
            assert "socket_keepalive" not in kwargs and "socket_keepalive_options" not in kwargs
        else:
            assert kwargs["socket_keepalive"] is True
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert kwargs["socket_keepalive_options"][socket.TCP_KEEPIDLE] <= 30


def test_cli_client_reads_with_a_timeout(redis_url):
    client, _ = cli_ops._store(types.SimpleNamespace(redis=redis_url))
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 5 and kwargs["socket_keepalive"] is True
    finally:
        client.close()


def test_worker_recovers_from_silently_cut_connections(redis, proxy, tmp_path):
    procs = _workers(tmp_path, proxy.url, "stallcut", "stallcut", "lease: 6s")
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        assert _completes_in(redis, store, "stallcut") < 2
        beat = f"worker:{procs.ids[0]}"
        before = redis.hget(beat, "last_heartbeat")
        assert proxy.cut() >= 2  # the command pool's and the subscription's
        t = time.monotonic()
        wait_for(lambda: redis.hget(beat, "last_heartbeat") != before, 12, interval=0.05,
                 message="the heartbeat to resume after the cut")
        assert time.monotonic() - t < 12
        assert _completes_in(redis, store, "stallcut", timeout=10) < 10
    finally:
        procs.close()


def test_silently_cut_subscription_is_noticed_and_replaced(redis, proxy, tmp_path):
    """The job_submitted / cancel_job subscription, black-holed alone: the worker's PING goes unanswered, it
    subscribes again, and new jobs and cancels reach it at once, not by the 5 s fallback sweep or the heartbeat."""
    procs = _workers(tmp_path, proxy.url, "stallsub", "stallsub", "lease: 60s")  # heartbeat every 20 s
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        assert proxy.opened(b"SUBSCRIBE") == 1
        assert _completes_in(redis, store, "stallsub") < 2
        running = store.submit("stallsub", {"steps": 1, "step_ms": 0, "hang": True})
        wait_for(lambda: redis.hget(f"job:{running}", "status") == "in_progress", 5, interval=0.01)
        assert proxy.cut(b"SUBSCRIBE") == 1
        t = time.monotonic()
        assert store.cancel(running, "missed while deaf")  # published into the black hole
        # ping after 5 s quiet (SIGNALS_PING_AFTER_S), 2 s for the pong, 0.5 s before subscribing again
        wait_for(lambda: proxy.opened(b"SUBSCRIBE") == 2, 12, interval=0.02,
                 message=f"the worker to subscribe again\n{procs.log(0)[-2000:]}")
        assert time.monotonic() - t < 12
        # the cancel missed meanwhile is looked up on resubscribing (on_resubscribed), not left to the heartbeat
        wait_for(lambda: redis.hget(f"job:{running}", "status") == "failed", 3, interval=0.02,
                 message=f"the cancelled job to stop (now {redis.hget(f'job:{running}', 'status')})")
        # subscribed again just now, so the fallback sweep is ~5 s away: these come through job_submitted
        assert _completes_in(redis, store, "stallsub") < 1.5
        assert _completes_in(redis, store, "stallsub") < 1.5
        another = store.submit("stallsub", {"steps": 1, "step_ms": 0, "hang": True})
        wait_for(lambda: redis.hget(f"job:{another}", "status") == "in_progress", 3, interval=0.01)
        t = time.monotonic()
        assert store.cancel(another, "now")
        wait_for(lambda: redis.hget(f"job:{another}", "status") == "failed", 3, interval=0.02)
        assert time.monotonic() - t < 3
        assert '"job_signals.deaf"' in procs.log(0) or "no reply to PING" in procs.log(0)
    finally:
        procs.close()


def test_drain_with_redis_stalled_ends_within_stop_grace(redis, proxy, tmp_path):
    procs = _workers(tmp_path, proxy.url, "stalldrain", "stalldrain", "stop_grace: 4s")
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        job_id = store.submit("stalldrain", {"steps": 1, "step_ms": 0, "hang": True})
        wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "in_progress", 5, interval=0.01)
        proxy.stall()
        t = time.monotonic()
        procs.signal(0, signal.SIGTERM)
        procs.wait_exit(0, timeout=15)
        took = time.monotonic() - t
        log = procs.log(0)
        assert took < 4.0, f"exited {took:.1f} s after SIGTERM, past stop_grace\n{log[-3000:]}"
        assert "failed unexpectedly" not in log and "Traceback" not in log, log[-3000:]
        assert "job not handed back" in log
    finally:
        proxy.resume()
        procs.close()


def test_machines_worker_status_subscription_silently_cut_is_pinged_and_replaced(redis, proxy, caplog):
    """The machine's own worker_status subscription (resp.PubSub), black-holed: a quiet one is PINGed, and with
    no answer it subscribes again; transitions published after that reach the machine's inbox again."""
    import asyncio
    import json
    import logging

    from emp_machine.runtime import jobs
    from emp_machine.runtime.status import WorkerStatusSeen, watch_worker_status

    async def scenario():
        inbox: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(watch_worker_status(proxy.url, ["m-ws-worker-0"], inbox,
                                                       ping_after_s=0.5, pong_within_s=0.5))

        async def seen(status: str, within: float) -> WorkerStatusSeen | None:
            """Publish `status` for our worker until the machine's inbox shows it, or `within` runs out."""
            deadline = time.monotonic() + within
            while time.monotonic() < deadline:
                await asyncio.to_thread(redis.publish, jobs.CH_WORKER_STATUS,
                                        json.dumps({"worker_id": "m-ws-worker-0", "new_status": status}))
                try:
                    got = await asyncio.wait_for(inbox.get(), 0.1)
                except asyncio.TimeoutError:
                    continue
                if got.status == status:
                    return got
            return None

        try:
            assert await seen("idle", 5), "the subscription never carried a message"
            # quiet past ping_after_s, it pinged and was answered: still the one subscription
            await asyncio.sleep(1.5)
            assert proxy.opened(b"SUBSCRIBE") == 1
            assert proxy.cut(b"SUBSCRIBE") == 1
            await asyncio.to_thread(redis.publish, jobs.CH_WORKER_STATUS,
                                    json.dumps({"worker_id": "m-ws-worker-0", "new_status": "busy"}))
            await asyncio.sleep(0.2)
            assert inbox.empty()  # published into the black hole
            # a PING within ping_after_s of quiet, no pong within pong_within_s: subscribed again
            deadline = time.monotonic() + 5
            while proxy.opened(b"SUBSCRIBE") < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert proxy.opened(b"SUBSCRIBE") == 2
            assert await seen("busy", 5), "transitions did not reach the machine after subscribing again"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="emp.machine.status"):
        asyncio.run(scenario())
    assert any(r.getMessage() == "status.worker_status_deaf" for r in caplog.records)


def test_a_stalled_redis_does_not_hold_the_connectors_progress_calls(redis, proxy, tmp_path):
    """Progress is written off the connector's path: with every byte to Redis held, the simulation connector still
    runs all its steps (each awaited write used to hold it a round trip: 3x a job's time with Redis 100 ms
    away), the values reported meanwhile are coalesced, and the job completes at 100 once Redis is back."""
    import json

    procs = _workers(tmp_path, proxy.url, "stallprog", "stallprog")
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        job = store.submit("stallprog", {"steps": 20, "step_ms": 20})
        wait_for(lambda: redis.hget(f"job:{job}", "status") == "in_progress", 5, interval=0.01)
        proxy.stall()
        try:
            def connector_done():
                for line in procs.log(0).splitlines():
                    if f'"{job}"' in line and '"job.completed"' in line and '"connector_id"' in line:
                        return json.loads(line)
                return None
            # 20 steps of 20 ms: done well before a reply could come (the old worker waited for each)
            done = wait_for(connector_done, 4, interval=0.02,
                            message=f"the connector to finish while Redis is stalled\n{procs.log(0)[-3000:]}")
            assert redis.hget(f"job:{job}", "status") == "in_progress"  # its completion waits for Redis
        finally:
            proxy.resume()
        wait_for(lambda: redis.hget(f"job:{job}", "status") == "completed", 10, interval=0.01)
        assert float(redis.hget(f"job:{job}:progress", "progress")) == 100
        assert "progress not recorded" not in procs.log(0)
        assert done["duration_ms"] < 2000, done
    finally:
        procs.close()


def test_machines_worker_status_message_half_read_at_a_timeout_is_not_lost(redis, proxy):
    """The subscription's read is bounded (until the next PING is due): a timeout that fired with a message half
    read cancelled the read, its header was lost and the rest taken for replies of their own: the transition
    never reached the machine. The half-read reply is now picked up by the next read."""
    import asyncio
    import json

    from emp_machine.runtime import jobs
    from emp_machine.runtime.status import watch_worker_status

    proxy.split(b"message\r\n", 0.6)  # every published message arrives in two parts, 0.6 s apart

    async def scenario():
        inbox: asyncio.Queue = asyncio.Queue()
        # PINGs every 0.2 s of quiet: each read has at most that long, so the pause falls inside one
        task = asyncio.create_task(watch_worker_status(proxy.url, ["m-split-worker-0"], inbox,
                                                       ping_after_s=0.2, pong_within_s=2.0))
        try:
            deadline = time.monotonic() + 5
            while not (await asyncio.to_thread(redis.pubsub_numsub, jobs.CH_WORKER_STATUS))[0][1] \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            receivers = await asyncio.to_thread(redis.publish, jobs.CH_WORKER_STATUS, json.dumps(
                {"worker_id": "m-split-worker-0", "new_status": "busy", "current_job_id": "j1"}))
            assert receivers == 1
            seen = await asyncio.wait_for(inbox.get(), 5)
            assert (seen.worker_id, seen.status, seen.current_job_id) == ("m-split-worker-0", "busy", "j1")
            assert proxy.opened(b"SUBSCRIBE") == 1  # no resubscription on the way (the PINGs were answered)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())

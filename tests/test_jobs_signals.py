"""The async store and the wake-up: idle workers sleep until a job they serve is announced."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from emp_machine.runtime.jobs import AsyncJobStore, JobSignals, JobStore, contract_fields, submission_score

CAPS = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}


def test_async_store_runs_a_job_end_to_end(redis, redis_url):
    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        store = AsyncJobStore(client)
        job_id = await store.submit("sim", {"steps": 1})
        job = await store.claim(CAPS)
        assert job.id == job_id and job.payload() == {"steps": 1}
        assert await store.start(job_id, "w1") == "ok"
        assert await store.progress(job_id, "w1", 50) == "ok"
        assert await store.complete(job_id, "w1", {"done": True}) == "ok"
        assert (await store.reconcile()).adopted == 0
        await client.aclose()
    asyncio.run(main())
    assert redis.hget(f"job:{redis.hkeys('jobs:completed')[0]}", "status") == "completed"


def test_idle_worker_wakes_on_a_job_it_serves_and_not_on_others(redis, redis_url):
    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        store = AsyncJobStore(client)
        async with JobSignals(client, ["sim"]) as signals:
            signals.arm()
            assert await store.claim(CAPS) is None
            JobStore(redis).submit("other", {})
            assert await signals.wait(0.3) is False  # not our job type: stay asleep
            JobStore(redis).submit("sim", {}, job_id="mine")
            assert await signals.wait(5) is True
            hints = signals.arm()
            assert hints == []  # our own submit indexed the job: its message says so, no hint (API jobs: below)
            assert (await store.claim(CAPS, hints=hints)).id == "mine"
        await client.aclose()
    asyncio.run(main())


def test_interrupt_wakes_a_pending_wait_and_a_cancelled_wait_leaves_nothing_behind(redis, redis_url):
    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        async with JobSignals(client, ["sim"]) as signals:
            signals.arm()
            waiting = asyncio.ensure_future(signals.wait(30))
            await asyncio.sleep(0)  # the wait is pending now
            assert not waiting.done()
            signals.interrupt()
            assert await waiting is True
            signals.arm()
            cancelled = asyncio.ensure_future(signals.wait(30))
            await asyncio.sleep(0)
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            assert signals._waiter is None
            JobStore(redis).submit("sim", {}, job_id="after")  # a later wait still wakes on a job
            assert await signals.wait(5) is True and signals.arm() == []  # (indexed by our submit: no hint)
        await client.aclose()
    asyncio.run(main())


def test_api_submitted_job_is_indexed_from_its_announcement(redis, redis_url):
    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        store = AsyncJobStore(client, reconcile_min_interval_s=3600)  # only the hint can index it
        store._last_reconcile = float("inf")
        async with JobSignals(client, ["sim"]) as signals:
            signals.arm()
            redis.hset("job:api", mapping=contract_fields("api", "sim", {}))
            redis.zadd("jobs:pending", {"api": submission_score(50, 1_700_000_000_000)})
            redis.publish("job_submitted", json.dumps({"job_id": "api", "service_required": "sim"}))
            assert await signals.wait(5) is True
            assert await store.claim(CAPS) is None  # without the hint the index does not know it
            assert (await store.claim(CAPS, hints=signals.arm())).id == "api"
        await client.aclose()
    asyncio.run(main())


def test_requeued_job_wakes_workers_and_cancel_reaches_the_callback(redis, redis_url):
    cancelled = []

    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        sync = JobStore(redis, avoid_reclaim_s=0)
        job_id = sync.submit("sim", {})
        sync.claim({**CAPS, "worker_id": "w9"})
        async with JobSignals(client, ["sim"], on_cancel=lambda j, r: cancelled.append((j, r))) as signals:
            signals.arm()
            sync.hand_back(job_id, "w9", "drain")
            assert await signals.wait(5) is True
            assert signals.arm() == []  # re-queued jobs are already indexed: no hint needed
            sync.claim(CAPS)
            sync.cancel(job_id, "user asked")
            for _ in range(500):
                if cancelled:
                    break
                await asyncio.sleep(0.01)
        await client.aclose()
    asyncio.run(main())
    assert cancelled and cancelled[0][1] == "user asked"


def test_lost_subscription_reconnects_and_wakes_the_worker(redis, redis_url):
    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        resubscribed = []
        async with JobSignals(client, ["sim"], reconnect_delay_s=0.05,
                              on_resubscribed=lambda: resubscribed.append(1)) as signals:
            signals.arm()
            assert not resubscribed  # (not for the first subscription)
            assert redis.client_kill_filter(_type="pubsub") >= 1
            assert await signals.wait(5) is True  # woken: messages may have been missed
            assert resubscribed == [1]  # and told, to look up the cancels it may have missed
            signals.arm()
            for _ in range(500):  # wait until the new subscription is in place
                if redis.pubsub_numsub("job_submitted")[0][1] >= 1:
                    break
                await asyncio.sleep(0.01)
            redis.publish("job_submitted", json.dumps({"job_id": "after", "service_required": "sim"}))  # the API's
            assert await signals.wait(5) is True
            assert signals.arm() == ["after"]
        await client.aclose()
    asyncio.run(main())


def test_a_malformed_message_never_ends_the_listener(redis, redis_url):
    # Another producer's message with a field of the wrong type (service_required a list) raised TypeError in
    # the listener and ended it: no more wake-ups or cancels for that worker, silently. Now such a field is
    # read as absent, a message that is not UTF-8 is read with replacement characters, and a failing
    # on_cancel is logged: the listener goes on.
    import redis as redis_lib

    cancelled = []

    def on_cancel(job_id, reason):
        if job_id == "boom":
            raise RuntimeError("a broken callback")
        cancelled.append((job_id, reason))

    def subscribed():
        return redis.pubsub_numsub("job_submitted")[0][1] >= 1

    async def until(condition):
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        raw = redis_lib.Redis.from_url(redis_url)
        async with JobSignals(client, ["sim"], on_cancel=on_cancel, reconnect_delay_s=0.05) as signals:
            signals.arm()
            redis.publish("job_submitted", json.dumps({"job_id": "x1", "service_required": ["sim"]}))
            assert await signals.wait(5) is True  # the type read as absent: look rather than miss a job
            assert signals.arm() == ["x1"]
            redis.publish("job_submitted", json.dumps({"job_id": {"no": "id"}, "service_required": "sim"}))
            assert await signals.wait(5) is True and signals.arm() == []  # no id: a wake-up, no hint
            redis.publish("cancel_job", json.dumps({"job_id": ["x1"], "reason": "no id"}))  # ignored
            redis.publish("cancel_job", json.dumps({"job_id": "boom", "reason": "callback fails"}))
            raw.publish("job_submitted", b'{"job_id": "caf\xe9", "service_required": "sim"}')  # not UTF-8
            # Read with a replacement character, on the same subscription: the cancel right behind it is not
            # lost (it cost the subscription, and a cancel then waited for the heartbeat, 20 s by default).
            raw.publish("cancel_job", b'{"job_id": "j\xff", "reason": "bytes"}')
            redis.publish("cancel_job", json.dumps({"job_id": "j2", "reason": "user asked"}))
            assert await signals.wait(5) is True
            await until(lambda: len(cancelled) >= 2)  # both cancels read (the first alone raced the assertion)
            assert signals.arm() == ["caf\ufffd"] and cancelled == [("j\ufffd", "bytes"), ("j2", "user asked")]
            assert subscribed() and redis.pubsub_numsub("cancel_job")[0][1] == 1  # never resubscribed
            cancelled.clear()
            redis.publish("cancel_job", json.dumps({"job_id": "j3", "reason": "user asked"}))
            redis.publish("job_submitted", json.dumps({"job_id": "after", "service_required": "sim"}))
            assert await signals.wait(5) is True
            await until(lambda: cancelled)
            assert signals.arm() == ["after"] and cancelled == [("j3", "user asked")]
            assert not signals._task.done()
        raw.close()
        await client.aclose()
    asyncio.run(main())


def test_a_quiet_subscription_on_a_healthy_redis_is_kept(tmp_path, caplog):
    """A quiet subscription is PINGed and, answered, kept: the answer was lost in redis-py's decoding (Valkey
    answers a subscribed PING with a plain PONG), so every idle worker said `job_signals.deaf` and subscribed
    again every 7.5 s. Its messages still arrive decoded, bytes that are not UTF-8 replaced."""
    import logging
    from pathlib import Path

    import redis as redis_lib

    from emp_machine.runtime.redis_server import PrivateRedis

    with PrivateRedis(Path(tmp_path)) as server:
        admin = redis_lib.Redis.from_url(server.url, decode_responses=True)

        def calls(command: str) -> int:
            return int(admin.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

        async def main() -> None:
            client = aioredis.from_url(server.url, decode_responses=True)  # as the worker's own client
            resubscribed = []
            signals = JobSignals(client, ["sim"], on_resubscribed=lambda: resubscribed.append(1),
                                 ping_after_s=0.1, pong_within_s=0.5, reconnect_delay_s=0.05)
            async with signals:
                pings = calls("ping")
                deadline = asyncio.get_running_loop().time() + 10
                while calls("ping") < pings + 5:  # five quiet spells, each PINGed
                    assert asyncio.get_running_loop().time() < deadline, "no PINGs from the quiet subscription"
                    await asyncio.sleep(0.05)
                assert resubscribed == [] and calls("subscribe") == 1
                signals.arm()
                admin.publish("job_submitted", b'{"job_id": "j\xff1", "service_required": "sim"}')
                assert await signals.wait(5) is True
                assert signals.arm() == ["j\ufffd1"]
            await client.aclose()

        with caplog.at_level(logging.WARNING, logger="emp.jobs"):
            asyncio.run(main())
        assert not [r for r in caplog.records if "no reply to PING" in r.getMessage()]
        admin.close()


def test_hints_are_capped_while_a_worker_is_busy(redis, redis_url):
    # A worker running a long job does not arm: announcements of API jobs pile up as hints, all handed to its
    # next claim (one script adopting each). At most 256 are kept; the claim's reconcile finds the rest
    # (mutation audit M12: the cap could go with every test passing).
    marker = []

    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            async with JobSignals(client, ["sim"], on_cancel=lambda j, r: marker.append(j)) as signals:
                signals.arm()
                for i in range(400):
                    redis.publish("job_submitted", json.dumps({"job_id": f"api-{i}", "service_required": "sim"}))
                redis.publish("cancel_job", json.dumps({"job_id": "marker", "worker_id": "", "reason": "-"}))
                for _ in range(1000):  # read in order: once the marker is in, every announcement was read
                    if marker:
                        break
                    await asyncio.sleep(0.01)
                return signals.arm()
        finally:
            await client.aclose()

    hints = asyncio.run(main())
    assert marker == ["marker"] and hints == [f"api-{i}" for i in range(256)], len(hints)

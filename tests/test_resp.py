"""The machine's small Redis client (runtime/resp.py) against a real server."""

from __future__ import annotations

import asyncio

import pytest

from emp_machine.runtime.redis_server import PrivateRedis, free_port
from emp_machine.runtime.resp import MiniRedis, RespError


def run(coro):
    return asyncio.run(coro)


def test_ping_pipeline_reads_and_error_replies(redis, redis_url):
    redis.hset("worker:w1", mapping={"status": "busy", "current_job_id": "j1"})
    redis.set("worker:w1:heartbeat", "x", px=50_000)

    async def go():
        client = MiniRedis(redis_url)
        try:
            assert await client.ping()
            replies = await client.execute_many([("PING",), ("HMGET", "worker:w1", "status", "current_job_id", "nope"),
                                                 ("PTTL", "worker:w1:heartbeat"), ("PTTL", "worker:none:heartbeat"),
                                                 ("LPUSH", "worker:w1", "x"), ("PING",)])
            assert replies[0] == "PONG" and replies[1] == ["busy", "j1", None]
            assert 0 < replies[2] <= 50_000 and replies[3] == -2
            # an error reply comes back in its place, the replies after it intact
            assert isinstance(replies[4], RespError) and "WRONGTYPE" in str(replies[4]) and replies[5] == "PONG"
            with pytest.raises(RespError, match="WRONGTYPE"):
                await client.execute("LPUSH", "worker:w1", "x")
            assert await client.ping()  # an error reply leaves the connection usable
        finally:
            await client.aclose()

    run(go())


def test_publish_reaches_a_subscriber_with_unicode_intact(redis_url):
    async def go():
        client, sub = MiniRedis(redis_url), MiniRedis(redis_url).pubsub()
        await sub.subscribe("machine:status:m1")
        assert await sub.get_message(timeout=0.05) is None  # the subscribe confirmation is skipped
        receivers = await client.publish("machine:status:m1", '{"phase": "ready", "note": "\u00e9\u2713"}')
        message = await sub.get_message(timeout=2)
        await sub.aclose()
        await client.aclose()
        return receivers, message

    receivers, message = run(go())
    assert receivers == 1
    assert message == {"type": "message", "channel": "machine:status:m1", "data": '{"phase": "ready", "note": "\u00e9\u2713"}'}


def test_unreachable_server_is_a_connection_error():
    async def go():
        client = MiniRedis(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1)
        with pytest.raises(ConnectionError, match="cannot connect"):
            await client.ping()

    run(go())


def test_password_and_database_from_the_url_and_reconnect_after_a_restart(tmp_path):
    port = free_port()
    server = PrivateRedis(tmp_path / "a").start(port)
    try:
        import redis as redis_lib

        admin = redis_lib.Redis(port=port)
        admin.config_set("requirepass", "s3cret")
        admin.close()

        async def go():
            client = MiniRedis(f"redis://:s3cret@127.0.0.1:{port}/3")
            await client.execute("SET", "k", "v")
            assert await client.execute("GET", "k") == "v"
            wrong = MiniRedis(f"redis://:nope@127.0.0.1:{port}/0")
            with pytest.raises(RespError):
                await wrong.ping()
            server.stop()
            with pytest.raises(ConnectionError):
                await client.ping()
            server.start(port)
            admin = redis_lib.Redis(port=port)
            admin.config_set("requirepass", "s3cret")
            admin.close()
            assert await client.ping()  # reopened on the next call, AUTH again
            await client.aclose()

        run(go())
    finally:
        server.stop()


def test_a_refused_login_leaves_no_connection_open(tmp_path):
    # The machine's poller tries a wrong password again every second: each refused AUTH closes its socket
    # (mutation audit M12: without the close, one connection leaked a try, 20 after 20 tries). A server of its
    # own: the count is the whole server's.
    import time

    import redis as redis_lib

    async def main(url):
        client = MiniRedis(url.replace("redis://", "redis://refused-user:wrong@"))
        errors = []
        for _ in range(20):
            try:
                await client.ping()
            except RespError as exc:
                errors.append(exc)  # kept, as a caller logging its last error would
        return errors

    with PrivateRedis(tmp_path / "redis") as server:
        admin = redis_lib.Redis.from_url(server.url, decode_responses=True)
        try:
            admin.acl_setuser("refused-user", enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
            before = admin.info("clients")["connected_clients"]
            assert len(asyncio.run(main(server.url))) == 20
            deadline = time.monotonic() + 5
            while admin.info("clients")["connected_clients"] - before > 1:  # the server sees the closes soon after
                assert time.monotonic() < deadline, admin.info("clients")["connected_clients"] - before
                time.sleep(0.02)
        finally:
            admin.close()

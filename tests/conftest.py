"""Fixtures that start real servers: a Redis-compatible server from the binary the project installs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import redis as redis_lib

from emp_machine.runtime.redis_server import PrivateRedis
from emp_machine.telemetry.buffer import Buffer
from harness import deployment_variable
from otlp_receiver import OtlpReceiver

# A REDIS_URL (or RAILWAY_*, PORT, MACHINE_ID...) exported in the developer's shell must not send the tests,
# or the machines and workers they start, to the shared queue: gone for the whole session.
for _name in [name for name in os.environ if deployment_variable(name)]:
    del os.environ[_name]

# Nor write into the developer's own state root (~/.local/state/emp-machine): default state dirs and the
# registry of running machines (`.running/`) go to a folder of this session's.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="emp-tests-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real server for the session, on a free loopback port."""
    server = PrivateRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def redis(redis_server):
    """A client on a clean database: every test starts from FLUSHALL."""
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def machine_factory(tmp_path_factory, redis_server):
    """Start real machines from manifest text; each is stopped (SIGTERM, then KILL) at the end of the test."""
    from harness import RunningMachine, machine_env, write_manifest

    machines = []

    def start(body: str, *, redis_url: str | None = None, env: dict | None = None):
        state = tmp_path_factory.mktemp("m")
        manifest = write_manifest(state / "manifest.yaml", body, state, redis_url or redis_server.url)
        machine = RunningMachine(manifest, state, {**machine_env(), **(env or {})})
        machines.append(machine)
        return machine

    yield start
    for machine in machines:
        machine.close()


@pytest.fixture
def serve():
    """Start fake services (tests/fakes) and close them after the test: `serve(FakeA1111, step_s=0.05)`."""
    servers = []

    def start(cls, *args, **knobs):
        server = cls(*args, **knobs).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


@pytest.fixture
def receiver():
    """A real OTLP/HTTP receiver on a free loopback port (tests/otlp_receiver.py), stopped after the test."""
    rec = OtlpReceiver().start()
    yield rec
    rec.stop()


@pytest.fixture
def buffer(tmp_path):
    """A durable telemetry buffer in the test's folder, closed after the test."""
    buf = Buffer(tmp_path / "buffer.db")
    yield buf
    buf.close()

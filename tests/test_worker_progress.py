"""Progress as the EMP API sees it on Redis, from a connector that reports what it is told to (a plugin):
never backwards, a value Redis refused written again, and a refused 100 recorded by the completion."""

from __future__ import annotations

import contextlib

import pytest
import redis as redis_lib

from _helpers import install_plugin
from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.redis_server import PrivateRedis
from harness import Messages, WorkerProcs, wait_for

PLUGIN = '''
import asyncio, os
from emp_machine.connectors.base import Connector, JobResult


class ReportConnector(Connector):
    """Reports payload["values"] in order, `sleep` seconds apart; payload["gates"][i], when given, is a file
    whose existence value i waits for. Returns right after the last value."""
    name = "report"

    async def run(self, job, progress):
        values, gates = job.payload["values"], job.payload.get("gates") or {}
        for i, value in enumerate(values):
            gate = gates.get(str(i))
            while gate and not os.path.exists(gate):
                await asyncio.sleep(0.02)
            await progress(value, f"at {value}")
            if i < len(values) - 1:
                await asyncio.sleep(job.payload.get("sleep", 0))
        return JobResult(data={"reported": values})


class BusyConnector(Connector):
    """Computes for payload["seconds"], calling progress() every millisecond and awaiting nothing else."""
    name = "busy"

    async def run(self, job, progress):
        import time
        start = time.monotonic()
        end = start + job.payload["seconds"]
        while (now := time.monotonic()) < end:
            spin = now + 0.001
            while time.monotonic() < spin:
                pass
            await progress(1 + 98 * (now - start) / (end - start))
        return JobResult(data={})
'''


@contextlib.contextmanager
def _plugin_worker(tmp_path, monkeypatch, group: str):
    """One worker of the plugin's connectors (`group`: its manifest entry) on a Redis of its own."""
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "emp_plugin_report", PLUGIN, {"report": "ReportConnector", "busy": "BusyConnector"})
    monkeypatch.syspath_prepend(str(site))  # the manifest is validated here too, against installed connectors
    with PrivateRedis(tmp_path / "redis") as server:  # stopped whatever fails after it started
        procs = WorkerProcs(f"workers:\n{group}", tmp_path / "w", server.url, machine_id="prog",
                            environ={"PYTHONPATH": str(site)})
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        try:
            procs.start()
            procs.wait_up(client)
            yield procs, client, JobStore(client)
        finally:
            procs.close()
            client.close()


@pytest.fixture
def workers(tmp_path, monkeypatch):
    """One worker running the report connector (the tests make its Redis refuse writes)."""
    with _plugin_worker(tmp_path, monkeypatch, "  rep:\n    connector: report\n    job_types: [report]\n") as w:
        yield w


def _progress_values(messages: Messages, job_id: str) -> list[float]:
    return [float(body["progress"]) for channel, body in list(messages.seen)
            if channel == "update_job_progress" and body.get("job_id") == job_id]


def _refusing_writes(client):
    """Redis answers every write with OOM until the returned function is called (a full Redis)."""
    before = client.config_get("maxmemory")["maxmemory"]
    client.config_set("maxmemory", 1)
    return lambda: client.config_set("maxmemory", before)


def test_progress_never_goes_backwards_on_the_wire(workers):
    procs, client, store = workers
    messages = Messages(client, "update_job_progress")
    try:
        job = store.submit("report", {"values": [10, 60, 30, 0, 80], "sleep": 0.15})
        wait_for(lambda: client.hget(f"job:{job}", "status") == "completed", 10, interval=0.02)
        wait_for(lambda: 100.0 in _progress_values(messages, job), 3, interval=0.02, message="progress 100")
        values = _progress_values(messages, job)
        assert values == sorted(values), values
        assert 60.0 in values and 80.0 in values and 30.0 not in values, values
    finally:
        messages.close()


def test_a_refused_progress_100_is_recorded_by_the_completion(workers, tmp_path):
    procs, client, store = workers
    gate = tmp_path / "gate"
    job = store.submit("report", {"values": [50, 100], "gates": {"1": str(gate)}})
    wait_for(lambda: client.hget(f"job:{job}:progress", "progress") == "50", 10, interval=0.02)
    restore = _refusing_writes(client)
    try:
        gate.write_text("go")  # 100 reported, refused; the connector returns; the completion retries
        wait_for(lambda: "progress not recorded" in procs.log(0), 10, interval=0.02,
                 message=f"the refused progress write\n{procs.log(0)[-2000:]}")
    finally:
        restore()
    wait_for(lambda: client.hget(f"job:{job}", "status") == "completed", 15, interval=0.02)
    assert client.hget(f"job:{job}:progress", "progress") == "100", client.hgetall(f"job:{job}:progress")


def test_a_refused_progress_value_is_written_again_while_the_job_goes_quiet(workers, tmp_path):
    procs, client, store = workers
    second, last = tmp_path / "second", tmp_path / "last"
    job = store.submit("report", {"values": [50, 80, 100], "sleep": 0.15,
                                  "gates": {"1": str(second), "2": str(last)}})
    wait_for(lambda: client.hget(f"job:{job}:progress", "progress") == "50", 10, interval=0.02)
    restore = _refusing_writes(client)
    try:  # 80 is reported into the refusals; then the job is quiet (its last value waits for its gate)
        second.write_text("go")
        wait_for(lambda: "progress not recorded" in procs.log(0), 10, interval=0.02,
                 message=f"the refused progress write\n{procs.log(0)[-2000:]}")
    finally:
        restore()
    wait_for(lambda: client.hget(f"job:{job}:progress", "progress") == "80", 5, interval=0.05,
             message=f"80 written again (now {client.hget(f'job:{job}:progress', 'progress')})")
    assert client.hget(f"job:{job}", "status") == "in_progress"  # written again while the job still ran
    last.write_text("go")
    wait_for(lambda: client.hget(f"job:{job}", "status") == "completed", 10, interval=0.02)
    assert client.hget(f"job:{job}:progress", "progress") == "100"


def test_a_connector_that_only_computes_between_progress_calls_does_not_starve_the_heartbeat(tmp_path, monkeypatch):
    """progress() awaits nothing of its own (its writes go out in a task): it yields once per value it hands
    over, so a connector that only computes between calls leaves the worker its heartbeat. Without that, a
    1 s lease was never renewed while the job ran."""
    group = "  busy:\n    connector: busy\n    job_types: [busy]\n    lease: 1s\n"
    with _plugin_worker(tmp_path, monkeypatch, group) as (procs, client, store):
        job = store.submit("busy", {"seconds": 3})
        first = wait_for(lambda: client.zscore("jobs:leases", job), 10, interval=0.01, message="the job's lease")
        wait_for(lambda: (client.zscore("jobs:leases", job) or 0) >= first + 1000, 2.5, interval=0.02,
                 message="the lease renewed by the heartbeat while the job computes")
        assert client.hget(f"job:{job}", "status") == "in_progress"
        wait_for(lambda: client.hget(f"job:{job}", "status") == "completed", 10, interval=0.02,
                 message="the busy job completed")
        assert "job.lost" not in procs.log(0)

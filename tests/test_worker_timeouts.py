"""A job's deadline and a cancel hold whatever the connector does (real worker processes, real Redis):
a connector that ignores cancellation loses its job, not the worker's slot; a timed-out job fails as
retryable even when its connector returns or raises once cancelled. Also: a NaN / infinite progress is
ignored, and a spill of a result's blobs that cannot be written fails the job as retryable, with no
partial files left."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from emp_machine.runtime.jobs import JobStore
from _helpers import install_plugin
from harness import Messages, WorkerProcs, wait_for

PLUGIN = r'''
import asyncio, base64, os, resource
from pathlib import Path
from emp_machine.connectors.base import Connector, JobResult
from emp_machine.errors import FatalJobError, JobCancelled


class Stubborn(Connector):
    """Catches asyncio.CancelledError: `forever` keeps going (and reporting progress), `once` returns a
    result after its cancellation, `fatal` raises its own error instead, `quick` just finishes."""
    name = "stubborn"

    async def run(self, job, progress):
        p = job.payload or {}
        mode, ticks = p.get("mode", "forever"), 0
        await progress(1, f"attempt {job.attempt} started")
        while True:
            try:
                await asyncio.sleep(0.05)
                ticks += 1
                await progress(min(90, 1 + ticks), f"attempt {job.attempt} tick {ticks}")
            except asyncio.CancelledError:
                if mode == "fatal":
                    raise FatalJobError("service call aborted")
                if mode == "once":
                    await asyncio.sleep(0.5)
                    return JobResult(data={"finished_after_cancel": True})
            except JobCancelled:  # the worker gave up on this run: its progress says so
                if p.get("marker"):
                    Path(p["marker"]).write_text(f"attempt {job.attempt}")
            if mode == "quick":
                return JobResult(data={"quick": True})


class Wobbly(Connector):
    """Reports NaN and infinite percents between real ones."""
    name = "wobbly"

    async def run(self, job, progress):
        await progress(10, "ten")
        for bad in ("nan", "inf", "-inf"):
            await progress(float(bad), bad)
        await asyncio.sleep(0.15)  # past the progress throttle, so the next value goes out at once
        await progress(50, "half")
        return JobResult(data={"ok": True})


class Blobs(Connector):
    """Returns two inline base64 images; its process may write no file over `fsize` bytes (as a full
    disk would stop it): the first image fits, the second is cut off half-way."""
    name = "blobs"

    async def run(self, job, progress):
        p = job.payload or {}
        limit = p["fsize"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        small = b"\x89PNG\r\n\x1a\n" + os.urandom(limit // 4)
        big = b"\x89PNG\r\n\x1a\n" + os.urandom(limit * 3)
        return JobResult(data={"a": base64.b64encode(small).decode(), "b": base64.b64encode(big).decode()})
'''

CHANNELS = ("update_job_progress", "complete_job", "job_failed")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("timeouts_site")
    install_plugin(site, "emp_timeouts_", PLUGIN, {"stubborn": "Stubborn", "wobbly": "Wobbly", "blobs": "Blobs"})
    sys.path.insert(0, str(site))  # the manifest is validated here too, against installed connectors
    yield site
    sys.path.remove(str(site))


@pytest.fixture
def start(plugin_site, redis, redis_url, tmp_path):
    """Start worker processes for a manifest's `workers:` text; killed after the test."""
    started = []

    def run(body: str) -> WorkerProcs:
        procs = WorkerProcs(body, tmp_path / f"w{len(started)}", redis_url,
                            environ={"PYTHONPATH": str(plugin_site)})
        started.append(procs)
        procs.start()
        procs.wait_up(redis, timeout=40)
        return procs

    yield run
    for procs in started:
        procs.close()


@pytest.fixture
def messages(redis):
    msgs = Messages(redis, *CHANNELS)
    yield msgs
    msgs.close()


def status_of(redis, job_id):
    return redis.hget(f"job:{job_id}", "status")


def wait_status(redis, job_id, *statuses, timeout=15.0):
    return wait_for(lambda: status_of(redis, job_id) in statuses, timeout,
                    message=f"job {job_id} to reach {statuses} (now {status_of(redis, job_id)})")


def final_failures(messages, job_id):
    """The job's job_failed messages, once the final one (can_retry false) arrived."""
    def done():
        failed = messages.of("job_failed", job_id=job_id)
        return failed if any(not m["can_retry"] for m in failed) else None
    return wait_for(done, message=f"job {job_id}'s final job_failed")


STUBBORN = """
workers:
  s:
    connector: stubborn
    job_timeouts: {stubborn: 500ms}
    lease: 3s
"""


def test_a_connector_ignoring_its_timeout_loses_the_job_not_the_slot(start, redis, messages, tmp_path):
    # It used to hold the worker's one slot forever: the heartbeat renewed the lease, the next job waited.
    procs = start(STUBBORN)
    store = JobStore(redis)
    marker = tmp_path / "told"
    stuck = store.submit("stubborn", {"mode": "forever", "marker": str(marker)}, max_retries=2)
    first = wait_for(lambda: messages.of("job_failed", job_id=stuck), 15, message="the first timeout")[0]
    assert (first["error"], first["can_retry"], first["retry_count"]) == ("job timed out after 0.5s", True, 1)
    nxt = store.submit("stubborn", {"mode": "quick"})
    wait_status(redis, nxt, "completed")  # the slot came back (concurrency 1)
    wait_status(redis, stuck, "failed")  # its retry timed out the same way: failed for good
    # (the second job_failed reaches the subscriber a moment after the hash says failed)
    failures = wait_for(lambda: len(m := messages.of("job_failed", job_id=stuck)) == 2 and m, 10,
                        message="the second job_failed")
    assert [m["error"] for m in failures] == ["job timed out after 0.5s"] * 2
    # The abandoned run goes on detached: its progress raises JobCancelled and writes nothing.
    wait_for(marker.exists, 10, message="the abandoned run's progress to raise JobCancelled")
    seen = list(messages.seen)
    failed_at = seen.index(("job_failed", first))
    late = [m for c, m in seen[failed_at:] if c == "update_job_progress" and m["job_id"] == stuck
            and m.get("message", "").startswith("attempt 1 ")]
    assert late == []
    wid = procs.ids[0]
    wait_for(lambda: redis.hget(f"worker:{wid}", "status") == "idle", message="the worker idle")
    assert redis.hkeys(f"jobs:active:{wid}") == []
    log = procs.log(0)
    assert "connector stubborn ignored the cancellation of job " + stuck in log
    assert "Traceback" not in log


def test_an_api_cancel_of_a_connector_ignoring_it_frees_the_slot(start, redis, messages):
    procs = start(STUBBORN.replace("500ms", "60s"))
    store = JobStore(redis)
    stuck = store.submit("stubborn", {"mode": "forever"})
    wait_for(lambda: messages.of("update_job_progress", job_id=stuck, message="attempt 1 tick 1"),
             message="the connector running")
    assert store.cancel(stuck, "user pressed stop")
    nxt = store.submit("stubborn", {"mode": "quick"})
    wait_status(redis, nxt, "completed")  # within the two grace periods, not the 60 s timeout
    job = redis.hgetall(f"job:{stuck}")
    assert (job["status"], job["error"]) == ("failed", "Job cancelled by user")
    assert not messages.of("complete_job", job_id=stuck)
    wid = procs.ids[0]
    wait_for(lambda: redis.hkeys(f"jobs:active:{wid}") == [], message="the cancelled job released")
    assert "ignored the cancellation of job " + stuck in procs.log(0)


@pytest.mark.parametrize("mode", ["once", "fatal"])
def test_a_timed_out_job_fails_retryable_whatever_the_connector_does_once_cancelled(start, redis, messages,
                                                                                   mode):
    # `once` returned a result after the deadline and the job ended completed; `fatal` raised its own error
    # and the job failed for good, never retried.
    start(STUBBORN)
    store = JobStore(redis)
    job_id = store.submit("stubborn", {"mode": mode}, max_retries=2)
    wait_status(redis, job_id, "failed", "completed")
    assert status_of(redis, job_id) == "failed", redis.hget("jobs:completed", job_id)
    assert not redis.hexists("jobs:completed", job_id)
    failed = final_failures(messages, job_id)
    assert [(m["error"], m["can_retry"]) for m in failed] == [("job timed out after 0.5s", True),
                                                               ("job timed out after 0.5s", False)]


def test_nan_and_infinite_progress_are_ignored(start, redis, messages):
    # max(0, min(100, nan)) is 100: the job read as finished, then went back to 0 (-inf) and 50.
    start("workers:\n  w:\n    connector: wobbly\n")
    store = JobStore(redis)
    job_id = store.submit("wobbly", {})
    wait_for(lambda: messages.of("complete_job", job_id=job_id), message="complete_job")
    sent = [(m["progress"], m.get("message", "")) for m in messages.of("update_job_progress", job_id=job_id)]
    assert [p for p, _ in sent] == [0, 10, 50, 100], sent
    assert not {"nan", "inf", "-inf"} & {m for _, m in sent}


def test_a_spill_that_cannot_be_written_fails_retryable_and_leaves_no_files(start, redis, messages):
    # It read "connector raised OSError: [Errno 27] File too large", not retryable, and left the first image
    # and half of the second in the job's output directory.
    procs = start("workers:\n  b:\n    connector: blobs\n")
    store = JobStore(redis)
    job_id = store.submit("blobs", {"fsize": 1 << 20}, max_retries=2)
    wait_status(redis, job_id, "failed")
    failed = final_failures(messages, job_id)
    directory = Path(procs.state_dir) / "outputs" / procs.ids[0] / job_id
    expected = (f"cannot store the job's outputs in {directory}: File too large; "
                "free space there or fix its permissions")
    assert [(m["error"], m["can_retry"]) for m in failed] == [(expected, True), (expected, False)]
    assert [p for p in directory.rglob("*") if p.is_file()] == []
    assert "Traceback" not in procs.log(0)


def test_a_worker_holding_an_abandoned_run_still_exits_on_sigterm(start, redis, messages):
    # asyncio.run waited at exit for the run that refuses its cancellation: the worker wrote `offline` and
    # then hung until supervisord's SIGKILL (here, with no supervisord, forever).
    procs = start(STUBBORN)
    store = JobStore(redis)
    stuck = store.submit("stubborn", {"mode": "forever"}, max_retries=1)
    wait_for(lambda: "ignored the cancellation of job " + stuck in procs.log(0), 15, message="the run abandoned")
    procs.signal(0, signal.SIGTERM)
    assert procs.wait_exit(0, timeout=15) == 0, procs.log(0)[-3000:]
    assert redis.hget(f"worker:{procs.ids[0]}", "status") == "offline"


def test_telemetry_at_exit_keeps_within_stop_grace_when_the_collector_never_answers(start, redis):
    # The last shipping attempt got 5 s whatever was left of stop_grace: a collector that accepts and never
    # answers kept a stopped worker past supervisord's SIGKILL. The records stay buffered for the next start.
    with socket.create_server(("127.0.0.1", 0)) as hole:  # listens, never reads or answers
        port = hole.getsockname()[1]
        procs = start(f"telemetry:\n  otlp_endpoint: http://127.0.0.1:{port}\n"
                      "workers:\n  w:\n    connector: stubborn\n    stop_grace: 2s\n")
        store = JobStore(redis)
        job_id = store.submit("stubborn", {"mode": "quick"})
        wait_status(redis, job_id, "completed")
        mark = time.monotonic()
        procs.signal(0, signal.SIGTERM)
        assert procs.wait_exit(0, timeout=15) == 0, procs.log(0)[-3000:]
        took = time.monotonic() - mark
    assert took < 4.0, took  # within its 2 s grace and the exit's moment; it took over 5 s

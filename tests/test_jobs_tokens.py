"""Claim tokens: each attempt's writes carry the assigned_at its claim wrote, so a late write from an older
attempt (a reply lost and the write retried, a lease reaped while the job still ran) can never land on a
newer attempt of the same job, even one by the same worker. Store level on the session's real Redis, then
end to end through real worker processes (one behind a TCP proxy that loses a `fail` reply)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore, function_library
from _helpers import TcpProxy as _Proxy
from harness import Messages, WorkerProcs, wait_for

CAPS = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}


@pytest.fixture
def store(redis):
    return JobStore(redis, lease_s=30, avoid_reclaim_s=0)


def server_ms(redis) -> int:
    seconds, micros = redis.time()
    return seconds * 1000 + micros // 1000


def claim_again(store, redis, job):
    """w1 claims `job` again after its attempt ended; the server's clock first passes the old claim's
    millisecond (the token's resolution), as it always has in life (a lease or the avoid window between)."""
    claimed_ms = server_ms(redis)
    wait_for(lambda: server_ms(redis) > claimed_ms, 2, 0.001, message="the server clock to move on")
    again = store.claim(CAPS, start=True)
    assert again.id == job.id and again.token and again.token != job.token
    return again


def reaped_and_claimed_again(store, redis):
    """w1's first attempt of a job, reaped (its heartbeats stopped), then the job claimed again by w1."""
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {}, max_retries=3)
    first = store.claim(CAPS, start=True)
    assert first.id == job_id and first.token == redis.hget(f"job:{job_id}", "assigned_at")
    redis.zadd("jobs:leases", {job_id: 0})
    assert store.reap_expired_leases(confirm_s=0) == [job_id]
    return first, claim_again(store, redis, first)


def snapshot(redis, job_id):
    """Everything a finishing write could touch."""
    return {"job": redis.hgetall(f"job:{job_id}"), "progress": redis.hgetall(f"job:{job_id}:progress"),
            "active": redis.hgetall("jobs:active:w1"), "lease": redis.zscore("jobs:leases", job_id),
            "pending": redis.zscore("jobs:pending", job_id), "events": redis.lrange(f"job:{job_id}:events", 0, -1),
            "worker": redis.hgetall("worker:w1"), "completed": redis.hget("jobs:completed", job_id),
            "failed": redis.hget("jobs:failed", job_id)}


def _fail(store, job_id, token):
    return store.fail(job_id, "w1", "late", retryable=True, token=token).outcome


# Each finishing write, and what it returns when it is the attempt's own.
WRITES = {
    "fail": (_fail, "retried"),
    "complete": (lambda store, job_id, token: store.complete(job_id, "w1", {"x": 1}, final_progress=True,
                                                              token=token), "ok"),
    "progress": (lambda store, job_id, token: store.progress(job_id, "w1", 50, "late", token=token), "ok"),
    "hand_back": (lambda store, job_id, token: store.hand_back(job_id, "w1", "drain", token=token), "ok"),
    "start": (lambda store, job_id, token: store.start(job_id, "w1", token=token), "ok"),
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_write_from_an_older_attempt_is_lost_and_changes_nothing(store, redis, write):
    first, second = reaped_and_claimed_again(store, redis)
    before = snapshot(redis, first.id)
    assert before["job"]["worker_id"] == "w1" and first.id in before["active"] and before["lease"]
    op, _ = WRITES[write]
    assert op(store, first.id, first.token) == "lost"
    assert snapshot(redis, first.id) == before  # retry count, status, jobs:active, the lease, the timeline
    assert store.heartbeat("w1").renewed == [first.id]  # the newer attempt is still w1's


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_write_with_the_attempts_own_token_works(store, redis, write):
    first, second = reaped_and_claimed_again(store, redis)
    op, ok = WRITES[write]
    assert op(store, second.id, second.token) == ok
    assert snapshot(redis, second.id)["job"]["retry_count"] == ("1" if write == "fail" else "0")


@pytest.mark.parametrize("token", ["", None])
def test_a_write_without_a_token_goes_by_worker_id_as_before(store, redis, token):
    # The CLI, tests and older callers pass none: the newer attempt is w1's, so the write applies to it.
    first, _ = reaped_and_claimed_again(store, redis)
    kwargs = {} if token is None else {"token": token}
    assert store.progress(first.id, "w1", 40, **kwargs) == "ok"
    assert store.fail(first.id, "w1", "boom", retryable=True, **kwargs).outcome == "retried"
    assert redis.hget(f"job:{first.id}", "retry_count") == "1"


def test_a_retried_fail_after_the_same_worker_claimed_the_job_again_counts_no_attempt(store, redis):
    # The lost-reply case at store level: fail ran, its reply was lost, w1 claimed the retry, and then the
    # fail is sent again with the first attempt's token. It returns what the first try did (the worker
    # never heard it), and changes nothing.
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {}, max_retries=2)
    first = store.claim(CAPS, start=True)
    assert store.fail(job_id, "w1", "boom", retryable=True, token=first.token).outcome == "retried"
    second = claim_again(store, redis, first)
    before = snapshot(redis, job_id)
    again = store.fail(job_id, "w1", "boom", retryable=True, token=first.token)
    assert (again.outcome, again.retry_count) == ("retried", 1)
    assert snapshot(redis, job_id) == before
    assert before["job"]["retry_count"] == "1" and before["job"]["status"] == "in_progress"
    assert store.complete(job_id, "w1", {"ok": True}, token=second.token) == "ok"
    assert redis.hmget(f"job:{job_id}", "status", "retry_count") == ["completed", "1"]


def test_a_completion_sent_again_after_its_reply_was_lost_is_ok_and_writes_nothing(store, redis):
    # complete ran, its reply was lost, the worker's retry sends it again: the job is completed, so the
    # worker must hear 'ok' (not 'lost', which it logs as job.not_completed and counts nothing for).
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {})
    job = store.claim(CAPS, start=True)
    completions = Messages(redis, "complete_job")
    try:
        assert store.complete(job_id, "w1", {"x": 1}, final_progress=True, token=job.token) == "ok"
        wait_for(lambda: len(completions.of("complete_job", job_id=job_id)) == 1, message="complete_job")
        before = snapshot(redis, job_id)
        assert store.complete(job_id, "w1", {"x": 1}, final_progress=True, token=job.token) == "ok"
        assert snapshot(redis, job_id) == before
        # a marker published after the retry arrives after anything the retry published
        redis.publish("complete_job", '{"job_id": "marker"}')
        wait_for(lambda: completions.of("complete_job", job_id="marker"), message="the marker")
        assert len(completions.of("complete_job", job_id=job_id)) == 1
    finally:
        completions.close()
    # another worker's complete, or one without the attempt's token, still learns the job is not its own
    assert store.complete(job_id, "w2", {"x": 1}, token=job.token) == "lost"
    assert store.complete(job_id, "w1", {"x": 1}) == "lost"


def test_a_final_fail_sent_again_after_its_reply_was_lost_returns_failed_and_writes_nothing(store, redis):
    # Before, the retry found status=failed and took it for the API's cancel: a spurious 'cancelled' event.
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {}, max_retries=1)
    job = store.claim(CAPS, start=True)
    first = store.fail(job_id, "w1", "boom", retryable=True, token=job.token)
    assert (first.outcome, first.retry_count) == ("failed", 1)
    before = snapshot(redis, job_id)
    again = store.fail(job_id, "w1", "boom", retryable=True, token=job.token)
    assert (again.outcome, again.retry_count) == ("failed", 1)
    assert snapshot(redis, job_id) == before
    assert [e["ev"] for e in store.timeline(job_id).events] == ["submitted", "claimed", "started", "failed"]


def test_a_fail_after_the_api_cancelled_the_attempt_is_still_cancelled(store, redis):
    # The API's cancel writes status=failed too, but no failed_token: the worker's fail sees 'cancelled'.
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {})
    job = store.claim(CAPS, start=True)
    assert store.cancel(job_id, "user") is True
    assert store.fail(job_id, "w1", "Job cancelled by user", retryable=False, token=job.token).outcome == "cancelled"
    assert redis.hlen("jobs:active:w1") == 0 and redis.zscore("jobs:leases", job_id) is None
    assert store.complete(job_id, "w1", {"x": 1}, token=job.token) == "cancelled"


# -- end to end: real worker processes ------------------------------------------------------------------------

class DropFailReply(_Proxy):
    """A TCP proxy in front of Redis. The first `fail` FCALL reaches Redis, but its reply is dropped and the
    connection closed, as a network cut would; the worker's retry of it is held until `release()` is true
    (polled), then passes. Everything else passes through."""

    def __init__(self, upstream_port: int, release):
        self.release = release
        self.fail_call = (function_library()[1] + "fail").encode()
        self.fails_seen = 0
        self.dropped = threading.Event()
        self.held = threading.Event()
        super().__init__(upstream_port)

    async def _handle(self, client_reader, client_writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        drop = asyncio.Event()

        async def upstream():
            try:
                while data := await client_reader.read(65536):
                    if b"$5\r\nFCALL\r\n" in data and self.fail_call in data:
                        self.fails_seen += 1
                        if self.fails_seen == 1:
                            drop.set()  # this one runs in Redis; its reply is lost below
                        elif self.fails_seen == 2:
                            await self._hold()
                    up_writer.write(data)
                    await up_writer.drain()
            finally:
                up_writer.close()

        async def downstream():
            try:
                while data := await up_reader.read(65536):
                    if drop.is_set():
                        self.dropped.set()  # the script ran (here is its reply), but the worker never learns it
                        return
                    client_writer.write(data)
                    await client_writer.drain()
            finally:
                client_writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    async def _hold(self) -> None:
        self.held.set()
        deadline = time.monotonic() + 20
        while not self.release() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


LOST_REPLY = """
workers:
  tok:
    connector: simulation
    job_types: [toksim]
    lease: 3s
"""


def test_a_fail_whose_reply_was_lost_does_not_count_against_the_next_attempt(redis, redis_server, tmp_path):
    # The worker retries the fail (its reply was lost) while its freed slot claims the job again (the avoid
    # window is 1 s): the retry must not count a second attempt on the new one, nor pull it from under the
    # worker. The short lease makes the heartbeat beat every second, so a new attempt the worker forgot (its
    # bookkeeping popped by the old attempt's end) would be handed back as a stray while it runs (4 s).
    watcher = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    job_ids: list[str] = []

    def reclaimed() -> bool:  # the job runs again, one failed attempt counted
        status, count = watcher.hmget(f"job:{job_ids[0]}", "status", "retry_count")
        return status == "in_progress" and count == "1"

    proxy = DropFailReply(redis_server.port, reclaimed)
    procs = WorkerProcs(LOST_REPLY, tmp_path / "w", f"redis://127.0.0.1:{proxy.port}/0")
    try:
        with procs.running(redis):
            store = JobStore(redis)
            job_ids.append(store.submit("toksim", {"steps": 40, "step_ms": 100, "fail_attempts": 1}, max_retries=2))
            job_id = job_ids[0]
            wait_for(proxy.held.is_set, 15, message="the fail's retry after its reply was lost")
            assert proxy.dropped.is_set()
            wait_for(lambda: redis.hget(f"job:{job_id}", "status") in ("completed", "failed"), 20,
                     message=f"job to end\n{procs.log(0)[-3000:]}")
            assert redis.hmget(f"job:{job_id}", "status", "retry_count") == ["completed", "1"]
            events = [e["ev"] for e in store.timeline(job_id).events]
            assert events == ["submitted", "claimed", "started", "failed", "claimed", "started", "completed"], events
            wid = procs.ids[0]
            wait_for(lambda: redis.hget(f"worker:{wid}", "status") == "idle", message="the worker idle")
            assert redis.hlen(f"jobs:active:{wid}") == 0
            # one slot, released exactly once per attempt: the next job runs, alone
            nxt = store.submit("toksim", {"steps": 2, "step_ms": 10})
            wait_for(lambda: redis.hget(f"job:{nxt}", "status") == "completed", 10, message="the next job")
    finally:
        proxy.close()
        watcher.close()


class HoldComplete(_Proxy):
    """A TCP proxy in front of Redis that holds the first `complete` FCALL (everything before it passes)
    until `release` is set; `held` is set once it holds it."""

    def __init__(self, upstream_port: int):
        self.call = (function_library()[1] + "complete").encode()
        self.held, self.release = threading.Event(), threading.Event()
        super().__init__(upstream_port)

    def close(self) -> None:
        self.release.set()
        super().close()

    async def _handle(self, client_reader, client_writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(reader, writer, hold: bool):
            try:
                while data := await reader.read(65536):
                    if (hold and b"$5\r\nFCALL\r\n" in data and b"\r\n" + self.call + b"\r\n" in data
                            and not self.held.is_set()):
                        self.held.set()
                        while not self.release.is_set():
                            await asyncio.sleep(0.01)
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, up_writer, True), pipe(up_reader, client_writer, False),
                             return_exceptions=True)


def test_a_cancel_landing_while_complete_is_in_flight_is_released_once(redis, redis_server, tmp_path):
    # complete finds the job cancelled and releases it (one `cancelled` event). The worker then sent a fail
    # as well: a second `cancelled` event and, when it had not heard cancel_job, a job.not_failed warning
    # quoting an "interrupted" error.
    proxy = HoldComplete(redis_server.port)
    procs = WorkerProcs(LOST_REPLY, tmp_path / "w", f"redis://127.0.0.1:{proxy.port}/0")
    try:
        with procs.running(redis):
            store = JobStore(redis)
            job_id = store.submit("toksim", {"steps": 1, "step_ms": 10})
            wait_for(proxy.held.is_set, 15, message="the worker's complete")
            assert store.cancel(job_id, "user asked") is True
            proxy.release.set()
            wid = procs.ids[0]
            wait_for(lambda: redis.hlen(f"jobs:active:{wid}") == 0, 10,
                     message=f"the job released\n{procs.log(0)[-2000:]}")
            procs.signal(0, signal.SIGTERM)  # a graceful stop: anything the worker still sent is in by now
            assert procs.wait_exit(0) == 0
        events = [e["ev"] for e in store.timeline(job_id).events]
        assert events == ["submitted", "claimed", "started", "cancel_requested", "cancelled"], events
        assert redis.hmget(f"job:{job_id}", "status", "error") == ["failed", "Job cancelled by user"]
        assert not redis.hexists("jobs:completed", job_id) and "job.not_failed" not in procs.log(0)
    finally:
        proxy.close()


REUSED = """
workers:
  tokduo:
    connector: simulation
    job_types: [tokduo]
    concurrency: 2
    lease: 30s
"""


def test_a_job_reaped_while_running_and_claimed_again_by_the_same_worker_runs_once_at_a_time(
        redis, redis_server, tmp_path):
    # Concurrency 2: the free slot claims the reaped job while its first attempt still runs here. The first
    # attempt's writes are refused (its token is old) and it is stopped: after the second claim, progress on
    # the wire comes from the new attempt alone, and never goes backwards.
    procs = WorkerProcs(REUSED, tmp_path / "w", redis_server.url)
    with procs.running(redis):
        store = JobStore(redis)
        messages = Messages(redis, "update_job_progress")
        try:
            job_id = store.submit("tokduo", {"steps": 40, "step_ms": 50})
            wait_for(lambda: float(redis.hget(f"job:{job_id}:progress", "progress") or 0) >= 25, 10,
                     message="the first attempt under way")
            redis.zadd("jobs:leases", {job_id: 0})  # as if its heartbeats had stopped reaching Redis
            assert store.reap_expired_leases(confirm_s=0) == [job_id]
            wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "completed", 15,
                     message=f"job to complete\n{procs.log(0)[-3000:]}")
            wait_for(lambda: any(m.get("progress") == 100 for m in messages.of("update_job_progress", job_id=job_id)),
                     message="the last progress message")
        finally:
            messages.close()
        assert redis.hmget(f"job:{job_id}", "status", "retry_count") == ["completed", "0"]
        events = [e["ev"] for e in store.timeline(job_id).events]
        assert events == ["submitted", "claimed", "started", "lease_expired", "claimed", "started", "completed"]
        stream = messages.of("update_job_progress", job_id=job_id)
        claims = [i for i, m in enumerate(stream) if "status" not in m]  # the claim's own progress 0
        assert len(claims) == 2, stream
        after = [m["progress"] for m in stream[claims[1]:]]
        assert after == sorted(after) and after[-1] == 100, after
        assert '"job.lost"' in procs.log(0)  # the first attempt was told it lost the job, and stopped


@pytest.mark.parametrize("holder, written", [
    ("alive", False),    # this pid space, a live worker process (its argv `-m emp_machine worker`): left alone
    ("foreign", False),  # another container's or host's token: its pid says nothing here, left alone
    ("dead", True),      # this pid space, its pid gone: the dead worker's, marked offline, its job handed back
    ("reused", True),    # its pid alive but no worker's (reused): dead all the same
    ("none", True),      # no token (a hash of an earlier version, or a tool's): as before
])
def test_a_machine_acts_for_a_dead_worker_only_when_the_id_is_not_a_live_processs(store, redis, redis_url,
                                                                                   holder, written):
    # The machine marks a worker of its own that died offline (and, stopping, hands its jobs back). A machine of
    # the same id beside it (two containers overlapping in a deploy) did so for the other's live workers: their
    # heartbeat keys deleted, then their running jobs taken (see test_machine_lifecycle's twin machines).
    import os
    import subprocess
    import sys

    from emp_machine.runtime import jobs
    from emp_machine.runtime.identity import pid_space
    from emp_machine.runtime.resp import MiniRedis

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # a process with a worker's argv (`python -c ... emp_machine worker`), alive for the test
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "emp_machine", "worker"],
                             stdin=subprocess.PIPE)
    tokens = {"alive": f"{alive.pid}-abcdef012345-{pid_space()}", "foreign": f"{alive.pid}-abcdef012345-0123456789ab",
              "dead": f"{gone.pid}-abcdef012345-{pid_space()}", "reused": f"{os.getpid()}-abcdef012345-{pid_space()}",
              "none": ""}
    store.register_worker("w1", "m1", CAPS, instance=tokens[holder] or None)
    if not tokens[holder]:
        redis.hdel("worker:w1", "instance")
    job_id = store.submit("sim", {})
    store.claim(CAPS, start=True)
    store.heartbeat("w1")

    async def act():
        client = MiniRedis(redis_url)
        try:
            return await jobs.mark_worker_offline(client, "w1"), await jobs.settle_dead_worker(client, "w1", "test")
        finally:
            await client.aclose()

    try:
        marked, (handed, _) = asyncio.run(act())
    finally:
        alive.communicate(b"")
    if written:
        assert marked == "busy" and handed == [job_id]
        assert redis.hget("worker:w1", "status") == "offline" and not redis.exists("worker:w1:heartbeat")
        assert redis.hget(f"job:{job_id}", "status") == "pending"
    else:
        assert marked is None and handed == []
        assert redis.hget("worker:w1", "status") == "busy" and redis.exists("worker:w1:heartbeat")
        assert redis.hget(f"job:{job_id}", "status") == "in_progress"

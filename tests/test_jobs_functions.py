"""The scripts as a Redis function library: loaded on first use, reloaded when the server lost it, and
EVALSHA when the server will not have it; the claim's memo of capabilities and class answers (real server)."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore, function_library


def caps(worker_id="w1", gpu_gb=24):
    return {"worker_id": worker_id, "machine_id": "m1", "services": ["sim"], "hardware": {"gpu_memory_gb": gpu_gb}}


def calls(redis, command):
    return int(redis.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def our_libraries(redis):
    names = [dict(zip(lib[::2], lib[1::2]))["library_name"] for lib in redis.function_list()]
    return [name for name in names if name.startswith("emp_jobs_")]


def run_one_job(store, worker_id="w1"):
    job_id = store.submit("sim", {"n": 1})
    job = store.claim(caps(worker_id), start=True)
    assert job is not None and job.id == job_id and job.fields["status"] == "in_progress"
    assert store.complete(job_id, worker_id, {"ok": True}) == "ok"
    return job_id


def test_store_loads_the_library_on_first_use_and_calls_functions(redis):
    redis.function_flush()
    redis.config_resetstat()
    store = JobStore(redis)
    job_id = run_one_job(store)
    assert our_libraries(redis) == ["emp_jobs_" + function_library()[1].split("_")[2]]
    assert store.uses_functions and calls(redis, "fcall") >= 3 and calls(redis, "evalsha") == 0
    assert redis.hget("job:" + job_id, "status") == "completed"


def test_store_reloads_the_library_when_the_server_lost_it(redis):
    store = JobStore(redis)
    run_one_job(store)
    redis.function_flush()  # what a restarted Redis without persistence looks like
    run_one_job(store)
    assert store.uses_functions and len(our_libraries(redis)) == 1


def test_two_stores_loading_at_once_both_keep_functions(redis):
    redis.function_flush()
    first, second = JobStore(redis), JobStore(redis)
    run_one_job(first)  # loads the library
    second.uses_functions = True
    run_one_job(second, "w2")  # finds it there: no second load needed, no fallback
    assert first.uses_functions and second.uses_functions


@contextlib.contextmanager
def limited_user(redis, redis_server, denied: str):
    """A client of a fresh ACL user allowed every command but `denied`; the user is deleted afterwards."""
    redis.function_flush()
    user, password = f"no{denied}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                      commands=["+@all", f"-{denied}"])
    limited = redis_lib.Redis(host="127.0.0.1", port=redis_server.port, username=user, password=password,
                              decode_responses=True)
    try:
        yield limited
    finally:
        limited.close()
        redis.acl_deluser(user)


def test_a_server_refusing_function_load_gets_evalsha(redis, redis_server):
    # A user whose ACL forbids FUNCTION (as some managed Redis plans do): FCALL finds no library, FUNCTION
    # LOAD is refused, and the store runs the same scripts with EVALSHA from then on.
    with limited_user(redis, redis_server, "function") as limited:
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            limited.function_list()
        store = JobStore(limited)
        redis.config_resetstat()
        job_id = run_one_job(store)
        assert not store.uses_functions and calls(redis, "evalsha") >= 3 and our_libraries(redis) == []
        assert redis.hget("job:" + job_id, "status") == "completed"


def test_a_user_without_fcall_gets_evalsha_at_once(redis, redis_server):
    # FUNCTION allowed but FCALL not (an ACL that names commands one by one): loading the library helped
    # nothing, and every job call failed with NOPERM.
    with limited_user(redis, redis_server, "fcall") as limited:
        store = JobStore(limited)
        redis.config_resetstat()
        job_id = run_one_job(store)
        assert not store.uses_functions and calls(redis, "evalsha") >= 3
        assert redis.hget("job:" + job_id, "status") == "completed"


def test_a_server_with_fcall_renamed_away_gets_evalsha(tmp_path):
    # FCALL renamed away (rename-command), FUNCTION LOAD still there: the library loaded, and every FCALL
    # after it failed "unknown command" (only a load that failed switched to EVALSHA).
    import subprocess

    from emp_machine.runtime.redis_server import find_server_binary, free_port, server_argv, wait_for_ping

    port = free_port()
    server = subprocess.Popen([*server_argv(find_server_binary(), port, tmp_path), "--rename-command", "FCALL", ""],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis_lib.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        assert wait_for_ping("127.0.0.1", port, 10.0)
        store = JobStore(client)
        job_id = run_one_job(store)
        assert not store.uses_functions and client.hget("job:" + job_id, "status") == "completed"
        run_one_job(store, "w2")  # and on: no FCALL tried again
        assert int(client.info("commandstats")["cmdstat_evalsha"]["calls"]) >= 6
    finally:
        client.close()
        server.terminate()
        server.wait(10)


def test_an_async_store_loads_the_library_and_notes_it(redis, redis_url):
    # the workers' store: the same load, note and prune, awaited
    import asyncio

    import redis.asyncio as aioredis

    from emp_machine.runtime.jobs import LIBRARIES_KEY, AsyncJobStore

    redis.function_flush()
    redis.delete(LIBRARIES_KEY)
    redis.function_load("#!lua name=emp_jobs_000000000000\nredis.register_function('emp_jobs_000000000000_f', "
                        "function() return 1 end)")

    async def main():
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            store = AsyncJobStore(client)
            job_id = await store.submit("sim", {"n": 1})
            assert (await store.claim(caps())).id == job_id and store.uses_functions
            assert await store.complete(job_id, "w1", {"ok": True}) == "ok"
        finally:
            await client.aclose()

    asyncio.run(main())
    ours = "emp_jobs_" + function_library()[1].split("_")[2]
    assert sorted(our_libraries(redis)) == ["emp_jobs_000000000000", ours]  # within the kept ones
    assert list(redis.hgetall(LIBRARIES_KEY)) == [ours]
    redis.function_delete("emp_jobs_000000000000")


def test_fcall_refusals_are_told_from_a_missing_library_and_script_errors():
    # Redis 6 has no FCALL at all and quotes it `FCALL` (no such server here to run: its reply's text)
    from emp_machine.runtime.jobs import _fcall_refused, _function_missing

    for refusal in ("ERR unknown command `FCALL`, with args beginning with: `emp_jobs_x_claim`, `3`, ",
                    "ERR unknown command 'FCALL', with args beginning with: 'emp_jobs_x_claim' '3' ",
                    "User u has no permissions to run the 'fcall' command"):
        assert _fcall_refused(Exception(refusal)) and not _function_missing(Exception(refusal))
    for other in ("ERR Function not found", "WRONGTYPE Operation against a key holding the wrong kind of value",
                  "NOPERM No permissions to access a key"):
        assert not _fcall_refused(Exception(other))


def test_a_store_that_loads_the_library_deletes_the_oldest_beyond_the_kept_ones(redis):
    # Each version of the scripts is a library (~255 KB of the server's memory); a shared Redis kept every
    # version a fleet ever ran. The store that loads one keeps the LIBRARIES_KEPT last loaded.
    from emp_machine.runtime.jobs import LIBRARIES_KEPT, LIBRARIES_KEY

    redis.function_flush()
    redis.delete(LIBRARIES_KEY)
    old = [f"emp_jobs_{i:012x}" for i in range(LIBRARIES_KEPT + 2)]
    for name in old:
        redis.function_load(f"#!lua name={name}\nredis.register_function('{name}_f', function() return 1 end)")
    # loaded at 1000, 2000, ... ms except the first two, from before the list was kept (never noted)
    redis.hset(LIBRARIES_KEY, mapping={name: 1000 * i for i, name in enumerate(old) if i >= 2})
    redis.hset(LIBRARIES_KEY, "emp_jobs_gone00000000", 5)  # noted, then flushed by someone: forgotten
    store = JobStore(redis)
    run_one_job(store)
    ours = "emp_jobs_" + function_library()[1].split("_")[2]
    kept = sorted(our_libraries(redis))
    assert kept == sorted([ours, *old[-(LIBRARIES_KEPT - 1):]]), kept
    noted = redis.hgetall(LIBRARIES_KEY)
    assert sorted(noted) == kept and float(noted[ours]) > 1e12  # the server's clock, in ms
    redis.function_delete(ours)  # a machine of the newest version deleted it: this one loads it again
    run_one_job(store)
    assert ours in our_libraries(redis) and len(our_libraries(redis)) == LIBRARIES_KEPT
    for name in old[-(LIBRARIES_KEPT - 1):]:
        redis.function_delete(name)
    redis.delete(LIBRARIES_KEY)


def test_live_versions_past_the_kept_number_do_not_delete_each_other(redis):
    # Ten versions at once (each loaded within the hour): a load deleted the oldest, whose machines loaded it
    # again and deleted the next, hundreds of loads a second, calls failing "Function not found" (review 167).
    from emp_machine.runtime.jobs import LIBRARIES_KEPT, LIBRARIES_KEY

    redis.function_flush()
    redis.delete(LIBRARIES_KEY)
    seconds, _ = redis.time()
    live = [f"emp_jobs_{i:012x}" for i in range(LIBRARIES_KEPT + 2)]
    for i, name in enumerate(live):
        redis.function_load(f"#!lua name={name}\nredis.register_function('{name}_f', function() return 1 end)")
        redis.hset(LIBRARIES_KEY, name, seconds * 1000 - 60_000 * i)  # the oldest loaded 9 minutes ago
    run_one_job(JobStore(redis))
    assert set(live) <= set(our_libraries(redis)) and len(our_libraries(redis)) == len(live) + 1
    for name in live:
        redis.function_delete(name)
    redis.delete(LIBRARIES_KEY)


def test_a_lost_connection_does_not_switch_functions_off():
    from emp_machine.runtime.redis_server import free_port

    from redis.backoff import NoBackoff
    from redis.retry import Retry

    nobody = redis_lib.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    store = JobStore(nobody)
    with pytest.raises(redis_lib.exceptions.ConnectionError):
        store.claim(caps())
    assert store.uses_functions  # nothing was learned about the server


def test_script_errors_are_not_mistaken_for_a_missing_library(redis):
    store = JobStore(redis)
    run_one_job(store)
    redis.set("jobs:pending", "not a sorted set")  # WRONGTYPE inside the claim script
    with pytest.raises(redis_lib.exceptions.ResponseError, match="WRONGTYPE"):
        store.claim(caps())
    assert store.uses_functions


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_claim_memo_answers_each_worker_and_each_new_class(redis, functions):
    # Under FCALL the library remembers each worker's decoded capabilities and class answers between
    # calls; two workers with different hardware, and classes appearing after a worker's first claim,
    # must still each get exactly the jobs they meet.
    small, big = JobStore(redis, functions=functions), JobStore(redis, functions=functions)
    store = small
    store.submit("sim", {}, job_id="needs-80", requirements={"hardware": {"gpu_memory_gb": 80}})
    assert small.claim(caps("small", 24)) is None
    store.submit("sim", {}, job_id="needs-16", requirements={"hardware": {"gpu_memory_gb": 16}})
    store.submit("sim", {}, job_id="needs-48", requirements={"hardware": {"gpu_memory_gb": 48}})
    assert small.claim(caps("small", 24)).id == "needs-16"
    assert small.claim(caps("small", 24)) is None
    assert big.claim(caps("big", 80)).id == "needs-80"
    assert big.claim(caps("big", 80)).id == "needs-48"
    # The same capabilities under another worker id are another capability set: no answer is shared wrongly.
    store.submit("sim", {}, job_id="needs-80-again", requirements={"hardware": {"gpu_memory_gb": 80}})
    assert small.claim(caps("small-2", 24)) is None
    assert json.loads(redis.hget("jobs:active:big", "needs-80"))["worker_id"] == "big"


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_claim_messages_and_events_escape_odd_worker_ids(redis, functions):
    # claim.lua formats its timeline events and the progress-0 message itself: ids with quotes,
    # backslashes and non-ASCII must come out as valid JSON carrying the same text.
    odd = 'w"1\\ü-' + uuid.uuid4().hex[:6]
    store = JobStore(redis, functions=functions)
    pubsub = redis.pubsub()
    pubsub.subscribe("update_job_progress")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    job_id = store.submit("sim", {})
    capabilities = {**caps(odd), "machine_id": 'm"\\1'}
    assert store.claim(capabilities, start=True).id == job_id
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert json.loads(message["data"]) == {"job_id": job_id, "worker_id": odd, "progress": 0,
                                           "timestamp": json.loads(message["data"])["timestamp"]}
    events = [json.loads(e) for e in redis.lrange(f"job:{job_id}:events", 0, -1)]
    claimed, started = events[1], events[2]
    assert (claimed["ev"], claimed["worker_id"], claimed["machine_id"], claimed["retry_count"]) == \
        ("claimed", odd, 'm"\\1', 0)
    assert (started["ev"], started["worker_id"]) == ("started", odd) and started["t"] == claimed["t"]


# -- races mutation audit M12 found unpinned: each client below sends every command to the real server; the
# subclass only makes another store's step land at the one moment that matters ---------------------------------

def _library_name() -> str:
    return function_library()[1][:-1]


class _PrunedRightAfterLoad(redis_lib.Redis):
    """Another store prunes our library (FUNCTION DELETE, as a newer version's store does past LIBRARIES_KEPT)
    right after this store loaded it, before its FCALL."""

    def function_load(self, code, replace=False):
        reply = super().function_load(code, replace)
        redis_lib.Redis(connection_pool=self.connection_pool).function_delete(_library_name())
        return reply


class _LoadedByAnotherFirst(redis_lib.Redis):
    """Another store loads the library between this store's FCALL (not found) and its own FUNCTION LOAD."""

    def function_load(self, code, replace=False):
        redis_lib.Redis(connection_pool=self.connection_pool).function_load(code)
        return super().function_load(code, replace)  # "Library ... already exists"


def test_a_library_deleted_between_the_load_and_the_call_runs_that_call_by_evalsha(redis, redis_server):
    redis.function_flush()
    client = _PrunedRightAfterLoad.from_url(redis_server.url, decode_responses=True)
    try:
        store = JobStore(client)
        job_id = store.submit("sim", {"n": 1})  # FCALL: not found; load; deleted; FCALL again: EVALSHA
        assert redis.hget(f"job:{job_id}", "status") == "pending"
        assert store.uses_functions  # the next call loads it again
    finally:
        client.close()


def test_a_store_that_loses_the_load_race_keeps_functions(redis, redis_server):
    redis.function_flush()
    redis.config_resetstat()
    client = _LoadedByAnotherFirst.from_url(redis_server.url, decode_responses=True)
    try:
        store = JobStore(client)
        job_id = store.submit("sim", {"n": 1})
        assert redis.hget(f"job:{job_id}", "status") == "pending"
        assert store.uses_functions and calls(redis, "evalsha") == 0  # "already exists" is no refusal
    finally:
        client.close()


def test_the_machines_scripts_resend_their_source_on_noscript_only(tmp_path):
    # Any other error (WRONGTYPE, NOPERM, a timeout) sent the ~39 KB source again by EVAL, and after a timeout
    # could run the script twice. A server of its own: the counts are the whole server's.
    import asyncio

    from emp_machine.runtime.jobs import mark_worker_offline
    from emp_machine.runtime.redis_server import PrivateRedis
    from emp_machine.runtime.resp import MiniRedis, RespError

    with PrivateRedis(tmp_path / "redis") as server:
        admin = redis_lib.Redis.from_url(server.url, decode_responses=True)

        async def main():
            client = MiniRedis(server.url)
            try:
                await mark_worker_offline(client, "good")  # NOSCRIPT, then EVAL: cached from now on
                admin.config_resetstat()
                admin.rpush("worker:bad", "not a hash")
                with pytest.raises(RespError, match="WRONGTYPE"):
                    await mark_worker_offline(client, "bad")
            finally:
                await client.aclose()

        try:
            asyncio.run(main())
            assert (calls(admin, "eval"), calls(admin, "evalsha")) == (0, 1)
        finally:
            admin.close()

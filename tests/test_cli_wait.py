"""`submit --wait` and `job` against what other producers write (no machine: the CLI against the test Redis,
with this test as the other producer): a cancel on a busy Redis, progress that is no number, a log file or a
terminal for the bar, exit codes, a Redis that goes away and comes back, API/Node jobs with no timeline and
secrets in their error, a Redis URL with ?password=, several machines running."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis as redis_lib

from emp_machine.runtime.identity import redact_url
from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.redis_server import PrivateRedis, free_port
from harness import wait_for


class Cli:
    """`emp-machine ARGS` in the background; its stdout (a pipe, or a terminal with tty=True) and stderr are
    collected by threads as they come."""

    def __init__(self, *args: str, tty: bool = False, env: dict | None = None):
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        master = slave = None
        if tty:
            master, slave = pty.openpty()
        # faulthandler: a run that hangs is sent SIGABRT by wait(), which then shows where each thread was
        env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
        # SIGINT as at a terminal: a suite started in the background by a non-interactive shell (`... &`) runs
        # with SIGINT and SIGQUIT ignored, which its children inherit and Python keeps; the Ctrl-C test then
        # waited on a CLI that could not hear it
        self.proc = subprocess.Popen([sys.executable, "-m", "emp_machine", *args], env=env,
                                     stdout=slave if tty else subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        if tty:
            os.close(slave)
            out = threading.Thread(target=self._read_fd, args=(master, self._out), daemon=True)
        else:
            out = threading.Thread(target=self._read_fd, args=(self.proc.stdout.fileno(), self._out), daemon=True)
        err = threading.Thread(target=self._read_fd, args=(self.proc.stderr.fileno(), self._err), daemon=True)
        self._threads = [out, err]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read_fd(fd: int, into: list[bytes]) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a terminal's other end closed (EIO)
                break
            if not chunk:
                break
            into.append(chunk)

    @property
    def out(self) -> str:
        return b"".join(self._out).decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return b"".join(self._err).decode("utf-8", "replace")

    def job_id(self) -> str:
        return wait_for(lambda: self.out.split("\n", 1)[0].strip() if "\n" in self.out else None,
                        timeout=20, message="the job id on stdout")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:  # signals pending, blocked, ignored, caught (hex masks): a SIGINT that did nothing shows why
                masks = [line for line in open(f"/proc/{self.proc.pid}/status") if line.startswith("Sig")]
            except OSError as exc:
                masks = [str(exc)]
            self.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to stderr
            self.proc.wait(10)
            for t in self._threads:
                t.join(5)
            raise AssertionError(f"still running after {timeout} s; {''.join(masks)}its stacks and output:\n"
                                 f"{self.err}\nstdout: {self.out[-2000:]}") from None
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def cli():
    runs: list[Cli] = []

    def start(*args: str, **kw) -> Cli:
        run = Cli(*args, **kw)
        runs.append(run)
        return run
    yield start
    for run in runs:
        run.kill()


def _subscribers(client, channel: str) -> int:
    return dict(client.pubsub_numsub(channel)).get(channel, 0)


def _wait_subscribed(client, before: int) -> None:
    wait_for(lambda: _subscribers(client, "update_job_progress") > before, timeout=20,
             message="the CLI's subscription")


def _submit_and_wait(cli, client, redis_url: str, timeout: str = "60", **kw) -> tuple[Cli, str]:
    before = _subscribers(client, "update_job_progress")
    run = cli("submit", "--type", "nobody", "--payload", "{}", "--wait", "--timeout", timeout,
              "--redis", redis_url, **kw)
    job_id = run.job_id()
    _wait_subscribed(client, before)
    return run, job_id


def _progress(client, job_id: str, progress, message: str | None = None) -> None:
    body = {"job_id": job_id, "worker_id": "w-other", "progress": progress}
    if message is not None:
        body["message"] = message
    client.publish("update_job_progress", json.dumps(body))


def _complete(client, job_id: str) -> None:
    """What a worker's completion leaves for the waiting CLI: the hash's status, then complete_job."""
    client.hset(f"job:{job_id}", mapping={"status": "completed", "completed_at": "2026-01-01T00:00:01.000Z"})
    client.publish("complete_job", json.dumps({"job_id": job_id, "worker_id": "w-other", "status": "completed"}))


# -- following a job -------------------------------------------------------------------------------------------
def test_wait_sees_a_cancel_while_other_jobs_report_progress(cli, redis, redis_url):
    """A busy Redis never goes quiet: the cancel is noticed from its cancel_job message (and the regular
    re-read of the hash), not only after half a second without messages."""
    stop = threading.Event()

    def chatter():  # other jobs' progress, as on any fleet
        other = redis_lib.Redis.from_url(redis_url)
        while not stop.wait(0.05):
            other.publish("update_job_progress", json.dumps({"job_id": "another-job", "progress": 10}))
        other.close()

    thread = threading.Thread(target=chatter, daemon=True)
    thread.start()
    try:
        run, job_id = _submit_and_wait(cli, redis, redis_url, timeout="60")
        assert JobStore(redis).cancel(job_id, "operator cancel")
        started = time.monotonic()
        rc = run.wait(20)
        assert time.monotonic() - started < 10, "the wait went on after the cancel"
    finally:
        stop.set()
        thread.join(5)
    assert rc == 1, run.err
    assert run.out.splitlines()[-1] == f"{job_id}: failed (Job cancelled by user)"


def test_wait_skips_progress_that_is_no_number_and_clamps_the_rest(cli, redis, redis_url):
    run, job_id = _submit_and_wait(cli, redis, redis_url)
    for raw in ('"n/a"', "NaN", "Infinity", '{"pct": 5}', "true", "null", "[1]"):
        redis.publish("update_job_progress", '{"job_id": "%s", "progress": %s, "message": "bad"}' % (job_id, raw))
    _progress(redis, job_id, 250, "almost there, token=abcdef123456")
    wait_for(lambda: "progress 100%" in run.out, message="the clamped progress line")
    _progress(redis, job_id, "-5")
    wait_for(lambda: "progress 0%" in run.out, message="the clamped progress line")
    JobStore(redis).cancel(job_id, "done")
    assert run.wait(20) == 1, run.err
    assert "Traceback" not in run.err, run.err
    assert run.out.splitlines()[1:] == ["progress 100%  almost there, token=[REDACTED]", "progress 0%",
                                        f"{job_id}: failed (Job cancelled by user)"], run.out


def test_wait_into_a_log_prints_a_line_per_ten_percent(cli, redis, redis_url):
    """stdout is no terminal (a CI log, cron, a pipe): plain lines, no carriage returns."""
    run, job_id = _submit_and_wait(cli, redis, redis_url)
    for percent, message in ((5, None), (12, "step 1"), (18, "step 2"), (25, None), (55, "half\nway"), (100, None)):
        _progress(redis, job_id, percent, message)
    wait_for(lambda: "progress 100%" in run.out, message="the last progress line")
    _complete(redis, job_id)
    assert run.wait(20) == 0, run.err
    assert "\r" not in run.out
    assert run.out.splitlines() == [job_id, "progress 5%", "progress 12%  step 1", "progress 25%",
                                    "progress 55%  half way", "progress 100%", f"{job_id}: completed"], run.out


def test_wait_on_a_terminal_draws_the_bar(cli, redis, redis_url):
    run, job_id = _submit_and_wait(cli, redis, redis_url, tty=True)
    for percent in (5, 50, 100):
        _progress(redis, job_id, percent, f"at {percent}")
    wait_for(lambda: "100.0%" in run.out, message="the full bar")
    _complete(redis, job_id)
    assert run.wait(20) == 0, run.err
    assert "\r[#...................]   5.0% at 5" in run.out
    assert "\r[##########..........]  50.0% at 50" in run.out
    assert "\r[####################] 100.0% at 100" in run.out
    assert run.out.replace("\r\n", "\n").rstrip("\n").rsplit("\n", 1)[-1] == f"{job_id}: completed"


def test_wait_timeout_exits_124_and_says_the_job_goes_on(cli, redis, redis_url):
    run = cli("submit", "--type", "nobody", "--payload", "{}", "--wait", "--timeout", "1", "--redis", redis_url)
    assert run.wait(30) == 124, run.err
    job_id = run.out.splitlines()[0]
    assert run.out.splitlines()[-1] == f"{job_id}: still pending after 1s (the job goes on)"
    assert redis.hget(f"job:{job_id}", "status") == "pending"


def test_wait_goes_on_past_another_jobs_message_that_is_not_utf8(cli, redis, redis_url):
    # Channels every job shares: a message holding another producer's bytes (job_failed copies a hash's
    # workflow_id as it is) raised UnicodeDecodeError out of every `submit --wait` following any job.
    run, job_id = _submit_and_wait(cli, redis, redis_url)
    redis.publish("job_failed", b'{"job_id": "other", "workflow_id": "wf-\xff", "status": "failed"}')
    redis.publish("update_job_progress", b'{"job_id": "other", "progress": 5, "message": "caf\xe9"}')
    _progress(redis, job_id, 40, "half way")
    _complete(redis, job_id)
    assert run.wait(20) == 0, run.err
    assert run.out.splitlines()[-1] == f"{job_id}: completed" and "Traceback" not in run.err


def test_wait_interrupted_exits_130(cli, redis, redis_url):
    run, job_id = _submit_and_wait(cli, redis, redis_url)
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(20) == 130
    assert f"{job_id}: no longer followed (the job goes on" in run.err and "Traceback" not in run.err, run.err


def test_wait_rides_out_a_redis_restart(cli, tmp_path):
    """Redis stops while a job is followed and comes back (with its data): the wait goes on to the end."""
    server = PrivateRedis(tmp_path / "redis", persist=True).start()
    try:
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        run, job_id = _submit_and_wait(cli, client, server.url)
        port = server.port
        server.stop()
        wait_for(lambda: "retrying until the timeout" in run.err or run.proc.poll() is not None,
                 timeout=20, message="the CLI to see Redis go")
        assert run.proc.poll() is None, run.err  # still following
        server.start(port)
        wait_for(lambda: client.exists(f"job:{job_id}"), timeout=20, message="the job back from the AOF")
        wait_for(lambda: "reconnected to Redis" in run.err, timeout=20, message="the CLI to reconnect")
        _complete(client, job_id)
        assert run.wait(20) == 0, run.err
        assert run.out.splitlines()[-1] == f"{job_id}: completed"
        assert "Traceback" not in run.err
        client.close()
    finally:
        server.stop()


def test_wait_gives_up_on_a_redis_gone_for_good_at_the_timeout(cli, tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        run, job_id = _submit_and_wait(cli, client, server.url, timeout="6")
        client.close()
    finally:
        server.stop()
    assert run.wait(30) == 1
    assert "retrying until the timeout" in run.err, run.err
    assert f"lost Redis while following job {job_id} (ConnectionError); the job goes on" in run.err, run.err
    assert "Traceback" not in run.err


# -- `job` on jobs the EMP API and its Node workers ran (no job:{id}:events) ---------------------------------
SECRET_ERROR = ("upstream call failed: Authorization: Bearer sk-live-ABCDEFGH12345678 "
                "redis://:hunter2pass@cache:6379")


def _job(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emp_machine", "job", *args, "--redis", redis_url],
                          capture_output=True, text=True, timeout=30)


def test_job_of_an_api_job_shows_the_hash_steps_and_hides_secrets(redis, redis_url):
    redis.hset("job:api1", mapping={
        "id": "api1", "service_required": "comfyui", "priority": "50", "payload": "{}", "status": "failed",
        "created_at": "2026-11-24T00:00:00.000Z", "retry_count": "3", "max_retries": "3",
        "worker_id": "node-worker-1", "assigned_at": "1795478401.250000", "started_at": "2026-11-24T00:00:02.500Z",
        "failed_at": "2026-11-24T00:00:09.000Z", "error": SECRET_ERROR})
    redis.hset("job:api1:progress", mapping={"progress": "40", "message": "calling https://u:hunter2pass@svc/ "
                                             "token=abcdef123456", "updated_at": "2026-11-24T00:00:05.000Z"})
    text = _job(redis_url, "api1")
    as_json = _job(redis_url, "api1", "--json")
    for out in (text, as_json):
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        for secret in ("sk-live-ABCDEFGH12345678", "hunter2pass", "abcdef123456"):
            assert secret not in out.stdout, out.stdout
    doc = json.loads(as_json.stdout)
    assert doc["error"].startswith("upstream call failed: Authorization: Bearer [REDACTED]")
    assert doc["progress"]["message"] == "calling https://u:[REDACTED]@svc/ token=[REDACTED]"
    assert [(s["event"], s["worker_id"], s["since_previous_ms"]) for s in doc["steps"]] == [
        ("submitted", "", None), ("claimed", "node-worker-1", 1250), ("started", "", 1250),
        ("failed", "", 6500)]
    assert "error=upstream call failed" in doc["steps"][3]["detail"] and "[REDACTED]" in doc["steps"][3]["detail"]
    assert doc["durations"] == {"queue_wait_ms": 1250, "claim_to_start_ms": 1250, "run_ms": 6500}
    assert doc["total_ms"] == 9000
    assert "error upstream call failed: Authorization: Bearer [REDACTED]" in text.stdout
    assert "steps queue wait 1.25 s, claim to start 1.25 s, run 6.50 s" in text.stdout, text.stdout


def test_job_of_an_api_job_retried_then_completed(redis, redis_url):
    """The hash keeps the failed attempt's time and error: that failure comes before the last claim."""
    redis.hset("job:api2", mapping={
        "id": "api2", "service_required": "comfyui", "status": "completed", "retry_count": "1",
        "created_at": "2026-11-24T00:00:00.000Z", "failed_at": "2026-11-24T00:00:03.000Z",
        "error": "password=hunter2pass rejected", "worker_id": "node-worker-2",
        "assigned_at": "2026-11-24T00:00:04.000Z", "started_at": "2026-11-24T00:00:04.500Z",
        "completed_at": "2026-11-24T00:00:06.000Z"})
    out = _job(redis_url, "api2", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [s["event"] for s in doc["steps"]] == ["submitted", "failed", "claimed", "started", "completed"]
    assert doc["durations"] == {"queue_wait_ms": 1000, "claim_to_start_ms": 500, "run_ms": 1500}
    assert doc["earlier_error"] == "password=[REDACTED] rejected" and "hunter2pass" not in out.stdout


def test_job_shows_durations_a_worker_measured_under_any_name(redis, redis_url):
    store = JobStore(redis)
    job_id = store.submit("simulation", {})
    redis.rpush(f"job:{job_id}:events", json.dumps({"t": 2_000_000_000_000, "ev": "completed", "worker_id": "w",
                                                    "steps": {"service_call": 40, "upload": 12}}))
    out = _job(redis_url, job_id, "--json")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert json.loads(out.stdout)["durations"] == {"service_call_ms": 40, "upload_ms": 12}


# -- where the job commands go ------------------------------------------------------------------------------
def test_redis_url_with_a_password_query_is_not_shown():
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?username=tokuser9&password=hunter2pass&socket_timeout=2"
    out = subprocess.run([sys.executable, "-m", "emp_machine", "stuck", "--redis", url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert (f"Redis at redis://127.0.0.1:{port}/0?username=***&password=***&socket_timeout=2 is not reachable"
            in out.stderr), out.stderr
    assert "hunter2pass" not in out.stderr and "tokuser9" not in out.stderr
    assert redact_url("rediss://h/1?api_key=k1;Token=t1&db=2#x") == "rediss://h/1?api_key=***;Token=***&db=2#x"
    assert redact_url("redis://:pw@h/0?secret=s&ok=1") == "redis://***@h/0?secret=***&ok=1"
    assert redact_url("redis://h/0?password=a#b&db=1") == "redis://h/0?password=***&db=1"
    plain = "redis://h:6379/0?db=1&health_check_interval=5"
    assert redact_url(plain) == plain


def test_job_commands_refuse_to_guess_among_several_running_machines(tmp_path, redis, redis_url):
    """Two machines running, none named: the job commands say so, as `ps` does, instead of falling back to
    the built-in manifest's Redis."""
    root = tmp_path / "state"
    for name in ("a", "b"):
        (root / "emp-machine" / name / "run").mkdir(parents=True)
        (root / "emp-machine" / name / "run" / "machine.json").write_text(json.dumps({
            "pid": os.getpid(), "socket": str(tmp_path / f"{name}.sock"), "machine_id": f"m-{name}",
            "manifest": f"/x/{name}.yaml", "logs": str(tmp_path), "redis_url": redis_url}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")} | {"XDG_STATE_HOME": str(root)}
    for args in (("submit", "--type", "simulation"), ("job", "some-id"), ("stuck",)):
        out = subprocess.run([sys.executable, "-m", "emp_machine", *args], capture_output=True, text=True,
                             timeout=30, env=env)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "2 machines are running (m-a (/x/a.yaml), m-b (/x/b.yaml)); choose one with --manifest" in out.stderr, \
            (args, out.stderr)
    assert redis.keys("job*") == []


def test_wait_prints_a_failed_jobs_error_with_control_characters_escaped(cli, redis, redis_url):
    # The error is a service's text: its ESC/OSC sequences reached the terminal raw (a title set, a line erased).
    run, job_id = _submit_and_wait(cli, redis, redis_url, timeout="60")
    redis.hset(f"job:{job_id}", mapping={"status": "failed", "error": "boom \x1b]0;PWNED\x07\x1b[2K",
                                          "failed_at": "2026-01-01T00:00:01.000Z"})
    redis.publish("job_failed", json.dumps({"job_id": job_id, "status": "failed", "error": "boom",
                                            "can_retry": False}))
    assert run.wait(20) == 1, run.err
    assert "\x1b" not in run.out and "\x07" not in run.out
    assert run.out.splitlines()[-1] == f"{job_id}: failed (boom \\x1b]0;PWNED\\x07\\x1b[2K)"


def test_wait_shows_only_its_own_jobs_progress(cli, redis, redis_url):
    # Progress of every job of the fleet comes on one channel: another job's must never show as this one's
    # (mutation audit M9: dropping the job id filter passed every test; the chatter test never read the output).
    run, job_id = _submit_and_wait(cli, redis, redis_url)
    _progress(redis, "someone-else", 90, "OTHER")
    _progress(redis, job_id, 40, "MINE")  # after the other's, on the same channel: read after it
    wait_for(lambda: "MINE" in run.out, message="this job's progress line")
    _complete(redis, job_id)
    assert run.wait(20) == 0, run.err
    assert run.out.splitlines() == [job_id, "progress 40%  MINE", f"{job_id}: completed"], run.out


def test_wait_exits_1_for_a_job_a_producer_marked_cancelled(cli, redis, redis_url):
    # The contract's cancel writes `failed`; a producer writing `cancelled` is an ending too, and not a success
    # (mutation audit M9: `--wait` exiting 0 for it passed every test).
    run, job_id = _submit_and_wait(cli, redis, redis_url)
    redis.hset(f"job:{job_id}", mapping={"status": "cancelled", "error": "cancelled by the user"})
    redis.publish("cancel_job", json.dumps({"job_id": job_id, "worker_id": "", "reason": "user"}))
    assert run.wait(20) == 1, run.err
    assert run.out.splitlines()[-1] == f"{job_id}: cancelled (cancelled by the user)", run.out

"""What the operating system may refuse the machine: a full disk, few file descriptors, no home directory, state
folders it cannot write or read, a clock on the submitter's host that runs ahead of Redis's (audits AI, AJ 4)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pwd
import re
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest

from emp_machine.runtime import status as st
from harness import http, http_json, machine_env, wait_for, write_manifest
from status_shape import check_status_message

PY = sys.executable
ONE_WORKER = """
workers:
  sim:
    connector: simulation
    count: 1
    stop_grace: 5s
"""
IS_ROOT = os.geteuid() == 0


def _no_passwd_uid() -> int:
    for uid in range(4242, 4300):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    pytest.skip("no free uid without a passwd entry")


def _plan(tmp_path: Path, workers: int = 1):
    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime import manifest as mf

    manifest = mf.loads(f"machine: {{type: test, id: lim, state_dir: {tmp_path / 'state'}}}\n"
                        "redis: {url: 'redis://127.0.0.1:1'}\n"
                        f"workers: {{sim: {{connector: simulation, count: {workers}}}}}\n", environ={})
    return plan.build(manifest, hardware.probe(), resolved_manifest=tmp_path / "manifest.json", environ={})


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "File \"" not in text, text


# --- 1. a full state disk -----------------------------------------------------------------------------------

def test_disk_problem_names_the_full_file_system_and_its_free_space(tmp_path):
    (tmp_path / "outputs").mkdir()
    assert st.disk_problem([str(tmp_path), str(tmp_path / "outputs")]) == ""  # the test disk has room
    full = st.disk_problem([str(tmp_path), str(tmp_path / "outputs")], floor=lambda total: total + 1)
    # one file system: named once, with what is free
    assert full.startswith(f"disk full: {tmp_path} (") and full.endswith(" free)") and full.count("disk full") == 1
    assert st.disk_floor(10 * 1024**4) == 64 * 1024**2 and st.disk_floor(1024**3) == 1024**3 // 100


def test_a_full_state_disk_makes_health_status_and_the_status_message_unhealthy(tmp_path, monkeypatch):
    from emp_machine.runtime.aggregate import Aggregator

    the_plan = _plan(tmp_path)
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(st, "DISK_FREE_FLOOR_BYTES", 1 << 62)  # every disk is "full" below this floor
    monkeypatch.setattr(st, "DISK_FREE_FLOOR_FRACTION", 2.0)
    reading = st._read_hardware(str(tmp_path / "state"), [])
    assert reading.disk_problem.startswith(f"disk full: {tmp_path / 'state'} (")
    agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="http://vm:9090")
    agg.set_phase("ready", True)
    agg.commit()
    before = json.loads(agg.health_body)["components"]["disk"]
    assert before == {"healthy": True, "reason": ""}
    agg.set_hardware(reading)
    agg.commit()
    health = json.loads(agg.health_body)
    assert agg.health_code == 503 and health["healthy"] is False
    assert health["components"]["disk"] == {"healthy": False, "reason": reading.disk_problem}
    assert reading.disk_problem in health["reasons"]
    message = json.loads(agg.status_body)  # /status, and what the publisher sends
    check_status_message(message, the_plan.machine_id, [w.worker_id for w in the_plan.workers])
    assert {s["health"] for s in message["status"]["services"].values()} == {"unhealthy"}
    assert agg.transition.is_set()  # a change of the disk verdict goes out at once
    assert reading.disk_problem.encode() in agg.page()


# --- 2. file descriptors --------------------------------------------------------------------------------------

def test_a_connection_that_sends_no_whole_request_head_is_closed_whatever_aiohttp_does(monkeypatch):
    """aiohttp before 3.14.4 started its keep-alive timeout only after a response, with no deadline for a request
    never finished: a client that connected and sent nothing, or a byte, kept its connection for ever. The
    machine's own deadline closes it, around any protocol (here one that would keep every connection open); a
    client that sent a whole request head is left to the protocol."""
    from emp_machine.runtime import health

    monkeypatch.setattr(health, "KEEPALIVE_TIMEOUT_S", 0.3)

    async def scenario():
        # asyncio.Protocol itself: reads and ignores everything, closes nothing
        server = await asyncio.get_running_loop().create_server(
            lambda: health._SaysSomething(asyncio.Protocol(), {}), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def clients():
            silent = socket.create_connection(("127.0.0.1", port), timeout=5)
            dribbling = socket.create_connection(("127.0.0.1", port), timeout=5)
            dribbling.sendall(b"G")  # a request begun and never finished
            talking = socket.create_connection(("127.0.0.1", port), timeout=5)
            # a whole head, in two pieces, its blank line split between them: the protocol's to answer
            talking.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r")
            talking.sendall(b"\n")
            started = time.monotonic()
            closed = [silent.recv(10), dribbling.recv(10)]
            waited = time.monotonic() - started
            talking.settimeout(1.0)
            try:
                still_open = talking.recv(10) != b""
            except TimeoutError:
                still_open = True
            for s in (silent, dribbling, talking):
                s.close()
            return closed, waited, still_open

        try:
            return await asyncio.to_thread(clients)
        finally:
            server.close()
            await server.wait_closed()

    closed, waited, still_open = asyncio.run(scenario())
    assert closed == [b"", b""] and waited < 4  # closed at the deadline, not left to the 5 s socket timeout
    assert still_open


def _health_server(tmp_path, **callbacks):
    """A HealthServer on a free loopback port over a one-worker plan; `callbacks` override metrics/errors."""
    from emp_machine.runtime.aggregate import Aggregator
    from emp_machine.runtime.health import HealthServer

    agg = Aggregator(_plan(tmp_path), {"sim": ("simulation",)}, "test", health_url="http://vm:9090")
    return HealthServer(agg, host="127.0.0.1", port=0, token=None, token_env="T", cors_origins=(),
                        process_names=set(), restart=lambda name: None, refresh=lambda: None,
                        **{"metrics": lambda: "", **callbacks})


def test_the_health_server_closes_idle_connections_and_bounds_open_ones(tmp_path, monkeypatch):
    """Past the limit a new connection takes the slot of the oldest idle one: one that sent nothing, or a
    keep-alive one between requests (70 such clients polling every 4.5 s used to keep the monitor out: 0 of
    198 polls answered). Only when every slot has a request being handled is a connection refused, with a
    503 the client can read (closed at once, its request unread, the kernel's reset threw the 503 away)."""
    import threading

    from emp_machine.runtime import health

    monkeypatch.setattr(health, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(health, "KEEPALIVE_TIMEOUT_S", 1.0)
    gate = threading.Event()  # /metrics is held until the test lets it go: a request being handled

    async def scenario():
        server = _health_server(tmp_path, metrics=lambda: (gate.wait(20), "")[1])
        port = await server.start()
        url = f"http://127.0.0.1:{port}"

        def clients():
            idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
            wait_for(lambda: len(server._bounded.idle) == 4, 5, message="four connections accepted")
            # every slot held by a connection that sent nothing: a poll takes the oldest one's slot
            taken = http(f"{url}/health", timeout=5)[2]
            evicted = idle[0].recv(10)
            started = time.monotonic()
            closed = [s.recv(10) for s in idle[1:]]  # b"": closed by the server, never answered
            waited = time.monotonic() - started
            for s in idle:
                s.close()
            # every slot held by a keep-alive connection between requests: a poll takes the oldest one's slot
            kept = []
            for _ in range(4):
                conn = HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                conn.getresponse().read()
                kept.append(conn)
            kept_taken = http(f"{url}/health", timeout=5)
            for conn in kept:
                conn.close()
            # every slot with a request being handled: the next connection is refused, and reads the 503
            wait_for(lambda: not server._bounded.of, 5, message="the keep-alive connections gone")
            busy = [threading.Thread(target=http, args=(f"{url}/metrics",), kwargs={"timeout": 20})
                    for _ in range(4)]
            for thread in busy:
                thread.start()
            wait_for(lambda: len(server._bounded.of) == 4 and not server._bounded.idle, 5,
                     message="four requests in flight")
            status, _, body = http(f"{url}/health", timeout=5)
            refused = (status, body)
            gate.set()
            for thread in busy:
                thread.join(20)
            after = http(f"{url}/health", timeout=5)
            return refused, (taken, evicted), closed, waited, kept_taken, after

        try:
            return await asyncio.to_thread(clients)
        finally:
            gate.set()
            await server.stop()

    (status, body), (taken, evicted), closed, waited, kept_taken, after = asyncio.run(scenario())
    assert b"too many" not in taken and evicted == b""  # answered (not refused), the oldest one closed
    assert closed == [b""] * 3 and waited < 4.5  # the keep-alive timeout (1 s here), not the 5 s socket timeout
    assert b"too many" not in kept_taken[2], kept_taken  # an idle keep-alive connection gave its slot
    assert status == 503 and b"too many open connections" in body
    assert b"too many" not in after[2]


def test_clients_that_never_read_a_large_response_do_not_hold_slots_past_the_limit(tmp_path, monkeypatch):
    """An evicted connection whose client never reads its multi-MB response stayed open for ever (a close()
    waits for the write buffer to drain): 12 such clients held 12 connections against a limit of 4."""
    from emp_machine.runtime import health

    monkeypatch.setattr(health, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(health, "EVICTED_DRAIN_S", 0.2)
    big = "x" * (4 * 1024 * 1024)

    async def scenario():
        server = _health_server(tmp_path, metrics=lambda: big)
        port = await server.start()

        def clients():
            stuck = []
            try:
                for _ in range(12):
                    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
                    stuck.append(conn)
                    time.sleep(0.05)
                open_now = wait_for(lambda: (n := len(server._bounded.server.connections)) <= 4 and n or None, 10,
                                    message="connections back within the limit")
                return open_now, http(f"http://127.0.0.1:{port}/health", timeout=5)[0]
            finally:
                for conn in stuck:
                    conn.close()

        try:
            return await asyncio.to_thread(clients)
        finally:
            await server.stop()

    open_now, polled = asyncio.run(scenario())
    assert open_now <= 4 and polled in (200, 503)


def test_malformed_requests_are_counted_not_logged_one_traceback_each(tmp_path, caplog):
    """aiohttp logs each malformed request as an ERROR with a traceback: junk sent to the public port wrote
    ~2,950 records a second into machine.log (its rotation wiped in under two minutes, /errors filled)."""
    import logging

    async def scenario():
        server = _health_server(tmp_path)
        port = await server.start()

        def clients():
            answers = []
            for junk in (b"GET / HTTP/9.9\r\n\r\n", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
                         b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n") * 5:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    conn.sendall(junk)
                    answers.append(conn.recv(12))
            return answers, http(f"http://127.0.0.1:{port}/health", timeout=5)[0]

        try:
            return await asyncio.to_thread(clients)
        finally:
            await server.stop()

    with caplog.at_level(logging.DEBUG):
        answers, health_status = asyncio.run(scenario())
    assert all(answer[:10] in (b"HTTP/1.1 4", b"HTTP/1.0 4") for answer in answers), answers
    assert health_status in (200, 503)  # answered as usual (503: the machine's state in this test, not a refusal)
    server_errors = [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.ERROR]
    assert server_errors == []
    said = [r for r in caplog.records if r.getMessage() == "health.bad_requests"]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


def test_one_errors_read_at_a_time_in_a_thread_of_its_own(tmp_path):
    """/errors reads every log file (1.9 s for 150 MB): eight at once in the default pool slowed /health and
    the machine's sweep, which shares that pool. A second read while one is under way gets 429."""
    import threading


    gate, threads = threading.Event(), []

    def errors(since):
        threads.append(threading.current_thread().name)
        gate.wait(20)
        return [{"message": "boom"}]

    async def scenario():
        server = _health_server(tmp_path, errors=errors)
        port = await server.start()
        url = f"http://127.0.0.1:{port}/errors?since=1h"

        def clients():
            first: list = []
            reader = threading.Thread(target=lambda: first.append(http(url, timeout=20)))
            reader.start()
            wait_for(lambda: threads, 5, message="the first read under way")
            second = http(url, timeout=5)
            gate.set()
            reader.join(20)
            return first[0], second, http(url, timeout=5)

        try:
            return await asyncio.to_thread(clients)
        finally:
            gate.set()
            await server.stop()

    first, second, third = asyncio.run(scenario())
    assert first[0] == 200 and b"boom" in first[2] and third[0] == 200
    assert second[0] == 429 and second[1].get("Retry-After") == "2"
    assert set(threads) == {threads[0]} and threads[0].startswith("health-errors")


def test_failed_accepts_out_of_descriptors_are_logged_once_per_interval(caplog):
    from emp_machine.runtime import machine

    now = [1000.0]
    handler = machine._quiet_accept_errors(clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open "
                                                                                              "files")}
        with caplog.at_level("ERROR", logger="emp.machine"):
            for _ in range(500):  # asyncio: up to the backlog per retry, a retry each second
                handler(loop, context)
            now[0] += machine.ACCEPT_ERROR_EVERY_S
            handler(loop, context)
    finally:
        loop.close()
    lines = [r for r in caplog.records if r.getMessage() == "health.accept_failed"]
    assert len(lines) == 2 and lines[1].fields["failures"] == 500  # the second counts what the first hid
    assert "ulimit -n" in lines[0].fields["detail"]


def _limits_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit")


def test_the_machine_raises_its_open_file_limit_and_boots_under_a_low_hard_limit(tmp_path, redis_server):
    """`ulimit -n 128` (hard): supervisord used to refuse (minfds 1024) with a message about a config file nobody
    wrote; the machine's soft limit of 64 is raised to the hard one, and idle clients cannot starve it."""
    state = tmp_path / "state"
    manifest = write_manifest(tmp_path / "m.yaml", ONE_WORKER, state, redis_server.url)
    out = open(tmp_path / "machine.out", "wb")
    proc = subprocess.Popen([PY, "-m", "emp_machine", "--manifest", str(manifest)], stdout=out,
                            stderr=subprocess.STDOUT, env=machine_env(),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 128)))
    held: list[socket.socket] = []
    try:
        log = tmp_path / "machine.out"
        wait_for(lambda: '"machine_ready"' in log.read_text(errors="replace") or proc.poll() is not None, 30,
                 message="machine ready")
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert "minfds" not in log.read_text(errors="replace")
        assert _limits_of(proc.pid) == (128, 128)
        port = json.loads((state / "run" / "machine.json").read_text())["health_port"]
        for _ in range(60):  # idle clients: more than the server keeps open at once
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for(lambda: http_json(f"http://127.0.0.1:{port}/health")[0] == 200, 20, message="/health 200")
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
        proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def test_supervisord_config_asks_for_no_more_descriptors_than_the_hard_limit(tmp_path):
    code = ("from pathlib import Path; from emp_machine.supervisor import config as c; "
            f"print(c.render([], c.Paths(Path({str(tmp_path)!r})), parent_pid=1, machine_id='m', "
            "log_max_bytes=1, log_backups=1))")
    text = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 128))).stdout
    assert "minfds = 128" in text.splitlines()


# --- 3. no home directory -------------------------------------------------------------------------------------

def test_no_home_directory_is_a_clear_problem(monkeypatch):
    from emp_machine.runtime import identity

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(identity.NoStateHome) as caught:
        identity.state_root({})
    text = str(caught.value)
    assert "machine.state_dir" in text and "EMP_MACHINE__STATE_DIR" in text and "XDG_STATE_HOME" in text
    assert caught.value.exit_code == 2
    assert identity.state_root({"XDG_STATE_HOME": "/x"}) == Path("/x/emp-machine")


@pytest.mark.parametrize("command", ["validate", "run", "ps"])
def test_validate_ps_and_run_without_a_home_directory_say_what_to_set(tmp_path, monkeypatch, command):
    folder = _world_readable_folder(tmp_path)
    manifest = folder / "m.yaml"
    manifest.write_text("machine: {type: test, id: nohome}\nredis: {url: 'redis://127.0.0.1:1'}\n"
                        "workers: {sim: {connector: simulation, count: 1}}\nhealth: {port: 0}\n")
    manifest.chmod(0o644)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    uid = None
    if IS_ROOT:  # the real thing: a uid with no passwd entry (docker run --user N)
        uid = _no_passwd_uid()
    else:
        def no_home():
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.setattr(Path, "home", staticmethod(no_home))
    args = {"validate": ["validate", str(manifest)], "run": ["--manifest", str(manifest)],
            "ps": ["ps", "--manifest", str(manifest)]}[command]
    rc, out = _cli_in_child(args, uid)
    assert rc == 2, out
    _no_traceback(out)
    assert "machine.state_dir" in out and "EMP_MACHINE__STATE_DIR" in out and "XDG_STATE_HOME" in out, out


def _world_readable_folder(tmp_path: Path) -> Path:
    """A folder another uid can read (pytest's tmp_path is under a 0700 folder of ours)."""
    folder = Path(tempfile.mkdtemp(prefix="emp-limits-"))
    folder.chmod(0o755)
    _CLEANUP.append(folder)
    return folder


_CLEANUP: list[Path] = []


@pytest.fixture(autouse=True)
def _cleanup_folders():
    yield
    while _CLEANUP:
        folder = _CLEANUP.pop()
        for path in (folder, *folder.rglob("*")):
            try:
                path.chmod(0o700)
            except OSError:
                pass
        shutil.rmtree(folder, ignore_errors=True)


def _import_everything_the_cli_may_need() -> None:
    """Every module of ours, the connectors' entry points (as validate loads them) and what they import: a
    child run as a uid that cannot read this interpreter's files fails on any import not done yet, and which
    ones an earlier test in this process did depends on the order the suite runs in."""
    import importlib
    import pkgutil
    import sqlite3  # noqa: F401 - the telemetry buffer's, imported by the connectors' base

    import emp_machine
    from emp_machine.connectors.registry import ConnectorRegistry

    for info in pkgutil.walk_packages(emp_machine.__path__, "emp_machine."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    ConnectorRegistry.discover()


def _cli_in_child(args: list[str], uid: int | None = None) -> tuple[int, str]:
    """`emp-machine ARGS` in a forked child (as `uid` when given: an exec'd interpreter could not be reached
    by a uid with no access to this one's home), its stdout and stderr together. The modules it needs are
    imported here first: the child may not be able to read the standard library's files."""
    import traceback

    from emp_machine.runtime import cli
    _import_everything_the_cli_may_need()

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 99
        try:
            os.close(read)
            stream = io.TextIOWrapper(os.fdopen(write, "wb"), encoding="utf-8", write_through=True)
            sys.stdout = sys.stderr = stream
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            code = cli.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - shown to the test as the traceback it is
            traceback.print_exc()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        out = fh.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


# --- 4. state folders that cannot be written ------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["logs", "outputs"])
def test_a_file_where_a_state_folder_should_be_is_a_clear_problem_at_boot(tmp_path, redis_url, folder):
    state = tmp_path / "state"
    state.mkdir()
    (state / folder).write_text("not a folder")
    manifest = write_manifest(tmp_path / "m.yaml", ONE_WORKER, state, redis_url)
    done = subprocess.run([PY, "-m", "emp_machine", "--manifest", str(manifest)], capture_output=True, text=True,
                          env=machine_env(), timeout=60)
    assert done.returncode == 2, done.stderr
    _no_traceback(done.stderr)
    assert f"cannot use {state / folder}: it is a file, not a folder" in done.stderr
    assert "machine.state_dir" in done.stderr


@pytest.mark.skipif(IS_ROOT, reason="root writes a read-only folder all the same")
def test_a_state_folder_this_user_cannot_write_is_a_clear_problem_at_boot(tmp_path, redis_url):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs").chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        manifest = write_manifest(tmp_path / "m.yaml", ONE_WORKER, state, redis_url)
        done = subprocess.run([PY, "-m", "emp_machine", "--manifest", str(manifest)], capture_output=True,
                              text=True, env=machine_env(), timeout=60)
    finally:
        (state / "logs").chmod(0o700)
    assert done.returncode == 2, done.stderr
    _no_traceback(done.stderr)
    assert f"cannot write {state / 'logs'}" in done.stderr


# --- 5. the machine's log file on a full disk ----------------------------------------------------------------

def test_the_machine_log_on_a_full_disk_neither_raises_nor_floods(tmp_path, capsys):
    from emp_machine.runtime.logfile import RotatingTee

    primary = io.StringIO()
    tee = RotatingTee(tmp_path / "logs" / "machine.log", 1 << 20, 2, primary=primary)
    tee._file.close()
    tee._file = open("/dev/full", "a", encoding="utf-8", buffering=1)  # every write: ENOSPC
    for n in range(50):
        tee.write(f"line {n}\n")
    tee.flush()
    assert primary.getvalue().count("\n") == 50  # stdout (the container's log) has every line
    err = capsys.readouterr().err
    assert err.count("emp-machine: cannot write") == 1 and "No space left on device" in err
    tee.close()


def test_closing_the_machine_log_on_a_full_disk_says_one_line(tmp_path, capsys):
    from emp_machine.runtime.logfile import RotatingTee

    tee = RotatingTee(tmp_path / "machine.log", 1 << 20, 2, primary=io.StringIO())
    tee._file.close()
    tee._file = open("/dev/full", "a", encoding="utf-8")  # block-buffered: the write waits for close()
    tee._file.write("the last line, without its newline")
    tee.close()  # before: OSError [Errno 28] out of cmd_machine_run, exit 1 after a clean drain
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be written" in err and "No space left" in err


# --- 7. another user's machine --------------------------------------------------------------------------------

@pytest.fixture
def foreign_state(tmp_path, redis_url):
    """A machine's state dir this user may not read: another uid's 0700 one when root, else one of ours 0000."""
    folder = _world_readable_folder(tmp_path)
    state = folder / "state"
    (state / "run").mkdir(parents=True)
    (state / "logs").mkdir()
    (state / "logs" / "machine.log").write_text("{}\n")
    manifest = write_manifest(folder / "m.yaml", ONE_WORKER, state, redis_url)
    manifest.chmod(0o644)
    state.chmod(0o700 if IS_ROOT else 0o000)
    return manifest, state


@pytest.mark.parametrize("args", [["ps"], ["restart", "worker-0"], ["logs", "machine"], ["errors"]])
def test_operator_commands_on_a_state_dir_this_user_cannot_read_say_so(foreign_state, args):
    manifest, state = foreign_state
    rc, out = _cli_in_child([*args, "--manifest", str(manifest)], _no_passwd_uid() if IS_ROOT else None)
    assert rc == 2, out
    _no_traceback(out)
    assert "no machine is running" not in out
    assert f"cannot read {state}/" in out and "run this as the machine's user" in out, out


# --- 8. the submitter's clock ahead of Redis's ----------------------------------------------------------------

def test_a_submitter_clock_ahead_of_redis_shows_no_negative_durations(redis, redis_url):
    from emp_machine.runtime import queries
    from emp_machine.runtime.jobs import JobStore, contract_fields, submission_score

    created_ms = int(time.time() * 1000) + 300_000  # the EMP API's host: 5 minutes ahead
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created_ms / 1000)) + f".{created_ms % 1000:03d}Z"
    redis.hset("job:skew", mapping=contract_fields("skew", "sim", {}, priority=50, created_at=iso))
    redis.zadd("jobs:pending", {"skew": submission_score(50, created_ms)})
    store = JobStore(redis, reconcile_min_interval_s=0)
    worker = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}
    store.register_worker("w1", "m1", worker)
    job = store.claim(worker, start=True)
    store.complete(job.id, "w1", {"ok": True}, token=job.token, steps={"service_call": 20.0})
    doc = queries.timeline(store, "skew")
    assert doc["total_ms"] is None and doc["durations"]["queue_wait_ms"] is None
    assert all(s["since_previous_ms"] is None or s["since_previous_ms"] >= 0 for s in doc["steps"])
    assert all(v is None or v >= 0 for v in doc["durations"].values())
    assert re.match(r"the submitter's clock is ahead of Redis by (29\d|300)\.\d s", doc["clock_note"])
    out = subprocess.run([PY, "-m", "emp_machine", "job", "skew", "--redis", redis_url], capture_output=True,
                         text=True, env=machine_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert not re.search(r"(?<![\w:.])-\d", out.stdout), out.stdout  # no negative duration anywhere
    assert "total -" in out.stdout and "queue wait -" in out.stdout
    assert "the submitter's clock is ahead of Redis by " in out.stdout

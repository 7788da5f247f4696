"""Starting and stopping a machine safely: one machine per state dir, the demo's own Redis, a full disk, zombies
and leftovers of services, a reboot right after a crash, SIGHUP, a service whose command cannot be run."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from harness import RunningMachine, health_base, http_json, machine_env, pid_alive, wait_for, write_manifest

PY = sys.executable

ONE_WORKER = """
workers:
  sim:
    connector: simulation
    count: 1
    stop_grace: 5s
"""


def _gone(pid: int) -> bool:
    """No such process at all: exited and reaped (a zombie still has its /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def test_demo_keeps_off_a_shells_redis_url(redis, redis_url, tmp_path):
    state = tmp_path / "state"
    env = {**machine_env(), "REDIS_URL": redis_url, "HUB_REDIS_URL": redis_url, "EMP_REDIS_URL": redis_url,
           "EMP_MACHINE__STATE_DIR": str(state), "EMP_MACHINE__ID": "demo-env", "EMP_HEALTH__PORT": "0"}
    err_path = tmp_path / "demo.err"
    with open(err_path, "wb") as err, open(tmp_path / "demo.out", "wb") as out:
        proc = subprocess.Popen([PY, "-m", "emp_machine", "demo"], stdout=out, stderr=err, env=env)
        try:
            wait_for(lambda: "submitted 5 demo jobs" in err_path.read_text() or proc.poll() is not None,
                     timeout=60, interval=0.1, message="the demo jobs to be submitted")
            text = err_path.read_text()
            assert proc.poll() is None, text
            pointer = json.loads((state / "run" / "machine.json").read_text())
            assert pointer["redis_url"] != redis_url  # its own embedded Redis
            assert text.count("ignoring REDIS_URL, HUB_REDIS_URL, EMP_REDIS_URL") == 1, text
            assert redis.keys("job:*") == [] and redis.keys("worker:*") == []  # nothing reached the 'shared' one
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0


def test_a_second_start_on_the_same_state_dir_is_refused_before_it_rewrites_anything(machine_factory):
    machine = machine_factory(ONE_WORKER)
    machine.wait_ready()
    resolved = machine.state_dir / "run" / "manifest.json"
    before = resolved.read_bytes()
    # the second start would resolve to another manifest (another region): it must not reach the file
    second = subprocess.run([PY, "-m", "emp_machine", "--manifest", str(machine.manifest)], capture_output=True,
                            text=True, timeout=60, env={**machine.env, "EMP_MACHINE__REGION": "elsewhere"})
    assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr
    assert "already running" in second.stderr and f"pid {machine.proc.pid}" in second.stderr, second.stderr
    assert f"machine test-{machine.state_dir.name}" in second.stderr, second.stderr
    assert resolved.read_bytes() == before
    assert machine.proc.poll() is None and machine.control.is_up()
    machine.signal(signal.SIGTERM)
    assert machine.wait_exit() == 0


def test_a_full_disk_at_start_is_a_clear_error_and_keeps_the_previous_manifest(tmp_path):
    state = tmp_path / "state"
    run = state / "run"
    run.mkdir(parents=True, mode=0o700)
    previous = run / "manifest.json"
    previous.write_text('{"previous": true}')
    manifest = write_manifest(tmp_path / "m.yaml", ONE_WORKER, state, "embedded")

    def small_files():  # any write past 64 bytes fails as on a full disk (EFBIG; Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    done = subprocess.run([PY, "-m", "emp_machine", "--manifest", str(manifest)], capture_output=True, text=True,
                          timeout=60, env={**machine_env(), "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=small_files)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot write {previous}" in done.stderr and "EMP_MACHINE__STATE_DIR" in done.stderr, done.stderr
    assert previous.read_text() == '{"previous": true}'  # not truncated
    assert sorted(p.name for p in run.iterdir()) == ["machine.lock", "manifest.json"]  # no temporary file left


def test_orphans_a_service_leaves_are_reaped(machine_factory, tmp_path):
    pidfile = tmp_path / "orphan.pid"
    script = tmp_path / "svc.py"
    script.write_text(f"import subprocess, time\n"  # the shell exits at once: its background sleep is orphaned
                      f"subprocess.run(['sh', '-c', 'sleep 0.2 & echo $! > {pidfile}'], check=True)\n"
                      "time.sleep(600)\n")
    machine = machine_factory(f"""
services:
  svc:
    command: {PY} {script}
""")
    machine.wait_ready()
    orphan = wait_for(lambda: _read_pid(pidfile), message="the orphan's pid")
    wait_for(lambda: _gone(orphan), timeout=10, message=f"the orphan {orphan} to be reaped (not left a zombie)")
    machine.signal(signal.SIGTERM)
    assert machine.wait_exit() == 0
    assert machine.event("shutdown.supervisord")["returncode"] == 0  # its own exit, not stolen by the sweep


def test_a_clean_shutdown_leaves_no_descendant_of_a_service(machine_factory, tmp_path):
    child = tmp_path / "child.py"
    child.write_text("import os, signal, sys, time\n"
                     "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                     "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
                     "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
                     "time.sleep(600)\n")
    own, group = tmp_path / "own-session.pid", tmp_path / "same-group.pid"
    script = tmp_path / "svc.py"
    script.write_text(f"import subprocess, sys, time\n"
                      f"subprocess.Popen([sys.executable, {str(child)!r}, {str(own)!r}], start_new_session=True)\n"
                      f"subprocess.Popen([sys.executable, {str(child)!r}, {str(group)!r}])\n"
                      "time.sleep(600)\n")
    machine = machine_factory(f"""
services:
  svc:
    command: {PY} {script}
    stop_grace: 2s
""")
    machine.wait_ready()
    pids = [wait_for(lambda p=p: _read_pid(p), message=f"{p.name}") for p in (own, group)]
    try:
        machine.signal(signal.SIGTERM)
        assert machine.wait_exit() == 0
        assert not [pid for pid in pids if pid_alive(pid)]
        assert set(machine.event("shutdown.leftovers")["pids"]) >= set(pids)
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_reboot_right_after_the_machine_was_killed_waits_for_the_orphaned_supervisord(machine_factory):
    body = f"""
services:
  stubborn:
    command: {PY} -c "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    stop_grace: 3s
workers:
  sim:
    connector: simulation
    count: 1
"""
    first = machine_factory(body)
    first.wait_ready()
    old_supervisord = int((first.state_dir / "run" / "supervisord.pid").read_text())
    first.proc.kill()
    # held where it is (still stopping its processes, still owning the socket) until the new machine saw it
    os.kill(old_supervisord, signal.SIGSTOP)
    first.wait_exit(10)
    second = RunningMachine(first.manifest, first.state_dir, first.env)
    try:
        second.wait_event("boot.stale_supervisord", pid=old_supervisord, timeout=30)
        os.kill(old_supervisord, signal.SIGCONT)
        second.wait_ready(40)
        assert not second.event("supervisord.lost")
        assert not pid_alive(old_supervisord)
        assert second.event("boot.stale_supervisord_gone", pid=old_supervisord)
        second.signal(signal.SIGTERM)
        assert second.wait_exit() == 0
    finally:
        if pid_alive(old_supervisord):
            os.kill(old_supervisord, signal.SIGKILL)
        second.close()


@pytest.fixture
def stale_supervisord(tmp_path):
    """A supervisord of a state dir whose machine is gone, still holding its socket: (paths, its process). Its
    parent, this test, stays alive, so it would never exit by itself."""
    from emp_machine.supervisor import config as svconfig
    from emp_machine.supervisor.control import Supervisor

    paths = svconfig.Paths(tmp_path / "state")
    svconfig.write([], paths, parent_pid=os.getpid(), machine_id="stale", log_max_bytes=1 << 20, log_backups=1)
    paths.logs.mkdir(exist_ok=True)
    stale = subprocess.Popen([PY, "-m", "supervisor.supervisord", "-c", str(paths.conf)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: Supervisor(paths.socket).is_up(), timeout=20, message="the stale supervisord")
        yield paths, stale
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()


def _boot_step_on(paths, stopping: threading.Event):
    """What Machine._clear_stale_supervisord reads of its machine."""
    return type("FakeMachine", (), {"_supervisords": [], "paths": paths, "_stopping": stopping})()


def _assert_killed(stale: subprocess.Popen, caplog) -> None:
    assert _gone(stale.pid)  # killed and reaped (by psutil: Popen's own returncode is not told)
    gone = [r for r in caplog.records if r.getMessage() == "boot.stale_supervisord_gone"]
    assert gone and gone[0].fields["killed"] == [stale.pid]


def test_a_stale_supervisord_that_does_not_exit_is_killed_after_the_wait(stale_supervisord, monkeypatch, caplog):
    from emp_machine.runtime import machine as machine_module

    paths, stale = stale_supervisord
    monkeypatch.setattr(machine_module, "STALE_SUPERVISORD_WAIT", 0.5)
    with caplog.at_level("INFO", logger="emp.machine"):
        machine_module.Machine._clear_stale_supervisord(_boot_step_on(paths, threading.Event()))
    _assert_killed(stale, caplog)


def test_a_stop_during_the_wait_for_a_stale_supervisord_ends_the_wait(stale_supervisord, monkeypatch, caplog):
    """A SIGTERM while a boot waited (up to 15 s) for a stale supervisord to stop was acted on only after the
    wait. The shutdown now cuts it short: the stale one is killed at once, as after the wait."""
    from emp_machine.runtime import machine as machine_module

    paths, stale = stale_supervisord
    monkeypatch.setattr(machine_module, "STALE_SUPERVISORD_WAIT", 120.0)  # the test's own timeout is shorter
    stopping = threading.Event()
    with caplog.at_level("INFO", logger="emp.machine"):
        waiter = threading.Thread(target=machine_module.Machine._clear_stale_supervisord,
                                  args=(_boot_step_on(paths, stopping),))
        waiter.start()
        wait_for(lambda: any(r.getMessage() == "boot.stale_supervisord" for r in caplog.records), timeout=20,
                 message="the wait to begin")
        stopping.set()  # what the machine's shutdown does
        waiter.join(60)
        assert not waiter.is_alive()
    _assert_killed(stale, caplog)


def test_a_stop_signal_before_the_runner_has_its_handlers_drains_instead_of_being_lost(machine_factory):
    """`run` execs into the runner, which spends ~0.5 s in imports and set-up before its handlers are in place.
    A SIGTERM then used to kill it outright, and as a container's PID 1 (no init) the kernel dropped it: the
    platform's SIGKILL came at its timeout. Held blocked until the handlers are in place, it drains."""
    machine = machine_factory(ONE_WORKER)
    wait_for(lambda: b"machine-run" in _cmdline(machine.proc.pid) or machine.proc.poll() is not None,
             timeout=30, interval=0.001, message="the exec into the machine runner")
    machine.proc.send_signal(signal.SIGTERM)  # (a later one, past the handlers, drains too: never a false alarm)
    assert machine.wait_exit() == 0, machine.tail()
    assert machine.event("shutdown.signal", signal="SIGTERM")
    assert machine.event("shutdown.done", exit_code=0)


def test_every_held_stop_signal_is_released_by_the_runner():
    from emp_machine.runtime import cli, machine as machine_module

    assert set(cli.HELD_SIGNALS) <= set(machine_module.SHUTDOWN_SIGNALS)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sighup_drains_like_sigterm(machine_factory):
    machine = machine_factory(ONE_WORKER)
    machine.wait_ready()
    worker = machine.process("worker-0").pid
    machine.signal(signal.SIGHUP)
    assert machine.wait_exit() == 0
    assert machine.event("shutdown.signal", signal="SIGHUP")
    messages = [e.get("message") for e in machine.events()]
    assert "shutdown.worker_stopped" in messages and messages[-1] == "shutdown.done"
    assert not pid_alive(worker)


def test_a_service_whose_command_cannot_run_is_errored_and_retried_after_the_cooldown(machine_factory):
    machine = machine_factory("""
services:
  missing:
    command: /nonexistent/bin/server --port {port}
    port: 7100
  retried:
    command: /nonexistent/bin/other
    restart: {cooldown: 1s}
""")
    machine.wait_ready()
    row = wait_for(lambda: (r := machine.process("missing-0")) and r.state == "ERRORED" and r,
                   timeout=10, message="missing-0 errored")
    assert "/nonexistent/bin/server" in row.errored_reason
    ps = json.loads(machine.cli("ps", "--json").stdout)
    shown = {p["name"]: p for p in ps["processes"]}["missing-0"]
    assert shown["state"] == "errored" and "/nonexistent/bin/server" in shown["errored_reason"]
    base = health_base(machine)
    service = wait_for(lambda: (s := http_json(base + "/health")[1]["services"]["missing-0"])["status"] == "errored"
                       and s, timeout=10, message="/health to say errored")
    assert "/nonexistent/bin/server" in service["errored_reason"]
    # the cool-down retry runs (and fails again, errored again): not left stopped for good
    wait_for(lambda: (r := machine.process("retried-0")) and r.state == "ERRORED" and r.restarts >= 1,
             timeout=30, message="retried-0 tried again after its cool-down")
    assert psutil.pid_exists(machine.proc.pid)

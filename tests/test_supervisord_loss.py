"""The machine's process tree when its supervisord dies or hangs: jobs handed back, a shutdown message, no strays."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import psutil
import pytest
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore
from _helpers import sitecustomize_env
from harness import pid_alive, wait_for

PY = sys.executable

HANGING_WORKERS = """
workers:
  sim:
    connector: simulation
    count: 2
    lease: 60s
    stop_grace: {grace}
"""


class StatusListener:
    """The machine status messages (update_type, phase), from a pattern subscription in a thread."""

    def __init__(self, url: str):
        self.client = redis_lib.Redis.from_url(url, decode_responses=True)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("machine:status:*")
        self.got: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            except (redis_lib.ConnectionError, OSError, ValueError):
                return
            if msg and msg["type"] == "pmessage":
                self.got.append(json.loads(msg["data"])["update_type"])

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.pubsub.close()
        self.client.close()


def _service_machine(machine_factory, tmp_path, source: str, settings: str = ""):
    """A machine running one service `svc`: `source` as its Python program, 2 s stop_grace, `settings` more."""
    script = tmp_path / "svc.py"
    script.write_text(source, encoding="utf-8")
    return machine_factory(f"""
services:
  svc:
    command: {PY} {script}
    stop_grace: 2s
    {settings}
""")


def _supervisord_pid(machine) -> int:
    return int((machine.state_dir / "run" / "supervisord.pid").read_text())


def _running_jobs(redis, count: int = 2) -> list[str]:
    store = JobStore(redis)
    jobs = [store.submit("simulation", {"steps": 1, "step_ms": 0, "hang": True}) for _ in range(count)]
    wait_for(lambda: all(redis.hget(f"job:{j}", "status") == "in_progress" for j in jobs), timeout=15,
             message="the jobs running")
    return jobs


def _handed_back(redis, jobs: list[str], timeout: float) -> None:
    wait_for(lambda: all(redis.hget(f"job:{j}", "status") == "pending" for j in jobs), timeout=timeout,
             interval=0.05, message=f"the jobs handed back: {[redis.hgetall(f'job:{j}') for j in jobs]}")
    store = JobStore(redis)
    for job_id in jobs:
        assert redis.hget(f"job:{job_id}", "worker_id") == ""
        assert [e["ev"] for e in store.timeline(job_id).events][-1] == "handed_back"


def test_a_stop_right_after_supervisord_is_lost_hands_the_running_jobs_back(machine_factory, redis):
    # The orphaned workers got one SIGTERM (they drain on their 30 s stop_grace) and a SIGKILL 5 s later: the
    # machine then exited 0 with both jobs in_progress under dead workers until their lease ran out.
    machine = machine_factory(HANGING_WORKERS.format(grace="30s"))
    machine.wait_ready()
    jobs = _running_jobs(redis)
    workers = [p.pid for p in machine.processes().values()]
    os.kill(_supervisord_pid(machine), signal.SIGKILL)
    machine.wait_event("supervisord.lost", action="restart once")
    machine.signal(signal.SIGTERM)
    assert machine.wait_exit(20) == 0
    _handed_back(redis, jobs, timeout=2)
    assert not any(pid_alive(p) for p in workers)


def test_second_supervisord_loss_hands_jobs_back_announces_shutdown_and_leaves_no_run_files(machine_factory,
                                                                                          redis, redis_url):
    listener = StatusListener(redis_url)
    try:
        machine = machine_factory(HANGING_WORKERS.format(grace="30s"))
        machine.wait_ready()
        first = _supervisord_pid(machine)
        os.kill(first, signal.SIGKILL)
        machine.wait_event("supervisord.lost", action="restart once")
        wait_for(lambda: len([e for e in machine.events() if e.get("message") == "machine_ready"]) == 2,
                 timeout=20, message="ready again under a new supervisord")
        jobs = _running_jobs(redis)
        second = _supervisord_pid(machine)
        assert second != first
        workers = [p.pid for p in psutil.Process(second).children()]
        os.kill(second, signal.SIGKILL)
        assert machine.wait_exit(20) == 1
        _handed_back(redis, jobs, timeout=2)
        assert not any(pid_alive(p) for p in workers)
        # the contract's shutdown message goes out on exit, this one too
        wait_for(lambda: listener.got and listener.got[-1] == "shutdown", timeout=5,
                 message=f"a shutdown status message last: {listener.got[-5:]}")
        run = machine.state_dir / "run"
        assert not (run / "supervisor.sock").exists() and not (run / "supervisord.pid").exists()
    finally:
        listener.close()


def test_a_stop_while_supervisord_hangs_stops_the_workers_within_their_grace(machine_factory, redis):
    # Each tier's stop call waited grace + 15 s on the silent supervisord, then the status read 5 s, then its
    # shutdown call: 45 s with a 3 s stop_grace, and no signal reached the workers for 43 s of them.
    machine = machine_factory(HANGING_WORKERS.format(grace="3s"))
    machine.wait_ready()
    jobs = _running_jobs(redis)
    supervisord = _supervisord_pid(machine)
    workers = [p.pid for p in psutil.Process(supervisord).children()]
    os.kill(supervisord, signal.SIGSTOP)
    try:
        started = time.monotonic()
        machine.signal(signal.SIGTERM)
        assert machine.wait_exit(3 + 7) == 0  # stop_grace, 2 s to find supervisord silent, and a margin
        elapsed = time.monotonic() - started
        _handed_back(redis, jobs, timeout=1)
        assert not any(pid_alive(p) for p in [*workers, supervisord])
        # each drained on its own within its grace, not killed (its own log is not written: supervisord, stopped,
        # holds the pipe)
        assert machine.event("shutdown.worker_stopped", direct=True, killed=[])
        assert elapsed < 10
    finally:
        if pid_alive(supervisord):
            os.kill(supervisord, signal.SIGCONT)


def test_a_forced_stop_leaves_no_socket_or_pidfile(machine_factory):
    machine = machine_factory(f"""
services:
  stubborn:
    command: {PY} -c "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('deaf', flush=True); time.sleep(600)"
    stop_grace: 60s
""")
    machine.wait_ready()
    wait_for(lambda: "deaf" in machine.log_of("stubborn-0"), timeout=10, message="the service ignoring SIGTERM")
    run = machine.state_dir / "run"
    assert (run / "supervisor.sock").exists() and (run / "supervisord.pid").exists()
    machine.signal(signal.SIGTERM)
    machine.wait_event("shutdown.drain")
    machine.signal(signal.SIGINT)
    assert machine.wait_exit(10) == 1
    assert not (run / "supervisor.sock").exists()
    assert not (run / "supervisord.pid").exists()


@pytest.mark.parametrize("setsid", [False, True], ids=["in its group", "setsid"])
def test_a_crashed_services_child_does_not_outlive_it_but_the_current_runs_does(machine_factory, tmp_path, setsid):
    # stopasgroup/killasgroup act on a stop only: after a crash the service's children ran on under the
    # machine, one more set at each restart. A child in its group goes with the group's crash kill; one that
    # left it (setsid) is adopted by the machine, the subreaper, which kills it once it sees it is an earlier
    # run's. The current run's own child (a helper it daemonized) is left alone.
    pids = tmp_path / "children"
    machine = _service_machine(
        machine_factory, tmp_path,
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
        f"start_new_session={setsid})\n"
        f"open({str(pids)!r}, 'a').write(f'{{child.pid}}\\n')\n"
        "time.sleep(600)\n")
    machine.wait_ready()

    def children() -> list[int]:
        return [int(x) for x in pids.read_text().split()] if pids.exists() else []

    wait_for(lambda: len(children()) == 1, timeout=10, message="the service's child")
    old = machine.process("svc-0").pid
    child = children()[0]
    if setsid:
        assert os.getsid(child) == child  # out of its service's group and session
    else:
        assert os.getpgid(child) == old  # in its service's group (supervisord makes each program a group leader)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: (p := machine.process("svc-0")) and p.state == "RUNNING" and p.pid != old, timeout=15,
             message="the service restarted")
    wait_for(lambda: len(children()) == 2, timeout=10, message="the new service's child")
    wait_for(lambda: not pid_alive(child), timeout=5, interval=0.05, message=f"the old child {child} gone")
    if setsid:
        # logged once the sweep's kill pass is over, a moment after the kill itself
        wait_for(lambda: machine.event("process.leftovers_killed", process_name="svc-0"), timeout=5,
                 message=f"process.leftovers_killed logged; {machine.tail()}")
    # the current run's child outlives a few more rounds of the sweep (one a second)
    new_child = children()[1]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert pid_alive(new_child)
        time.sleep(0.1)


def test_supervisord_dying_while_a_worker_drains_lets_it_finish_its_job(machine_factory, redis):
    # supervisord had sent the worker its SIGTERM (the worker drains) and died before answering the stop: the
    # machine, stopping the worker itself, sent a second SIGTERM, which a worker takes as "hand the running
    # jobs back at once", and a job that would have finished within the grace was given up and run again.
    machine = machine_factory("""
workers:
  sim:
    connector: simulation
    count: 1
    stop_grace: 20s
""")
    machine.wait_ready()
    store = JobStore(redis)
    job = store.submit("simulation", {"steps": 30, "step_ms": 100})
    wait_for(lambda: redis.hget(f"job:{job}", "status") == "in_progress", 10, message="the job running")
    machine.signal(signal.SIGTERM)
    wait_for(lambda: '"worker.draining"' in machine.log_of("worker-0"), 10, interval=0.02,
             message="the worker draining on supervisord's SIGTERM")
    os.kill(_supervisord_pid(machine), signal.SIGKILL)
    assert machine.wait_exit(25) == 0, machine.tail()
    assert redis.hget(f"job:{job}", "status") == "completed", redis.hgetall(f"job:{job}")
    assert machine.event("shutdown.worker_stopped", direct=True), machine.tail()


def test_a_restarted_services_daemonized_helper_is_left_alone(machine_factory, tmp_path):
    # The leftover check judged against the sweep's table of a round before: a service seen waiting out its
    # restart backoff, then started again, had the helper its new run daemonized (double fork and setsid, so
    # the machine adopts it at once) SIGKILLed as if it were the ended run's.
    helpers = tmp_path / "helpers"
    machine = _service_machine(
        machine_factory, tmp_path,
        "import subprocess, sys, time\n"
        "daemon = 'import subprocess, sys; p = subprocess.Popen([sys.executable, \"-c\", '\n"
        "daemon += '\"import time; time.sleep(600)\"], start_new_session=True, '\n"
        "daemon += 'stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); '\n"
        "daemon += 'print(p.pid)'\n"
        "pid = subprocess.run([sys.executable, '-c', daemon], capture_output=True, text=True).stdout.strip()\n"
        f"runs = open({str(helpers)!r}, 'a+')\n"
        "runs.write(pid + '\\n'); runs.flush(); runs.seek(0)\n"
        "if len(runs.read().split()) == 1:\n"
        "    time.sleep(0.5); sys.exit(3)  # the first run crashes; the second stays\n"
        "time.sleep(600)\n",
        "restart: {backoff_initial: 1500ms}")

    def started() -> list[int]:
        return [int(x) for x in helpers.read_text().split()] if helpers.exists() else []

    wait_for(lambda: len(started()) == 2, timeout=20, message="the service's second run and its helper")
    first, second = started()
    wait_for(lambda: not pid_alive(first), timeout=5, interval=0.05, message=f"the first run's helper {first} gone")
    # the second run's helper outlives several rounds of the sweep (one a second)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert pid_alive(second), machine.tail()
        time.sleep(0.1)


def test_a_stop_that_fails_still_ends_the_machine_and_its_processes(machine_factory, redis_url, tmp_path):
    # The shutdown sequence raising (as it did when supervisord was reaped under it) left the machine running
    # for good with nothing stopped. A fault injected into it (a sitecustomize on the machine's PYTHONPATH
    # replaces the ordered stop with one that raises): the machine logs why, sends its shutdown message,
    # stops everything itself, removes supervisord's run files and exits 1.
    env = sitecustomize_env(tmp_path / "inject",
                            "from emp_machine.runtime import machine\n"
                            "async def _failing_stop(self):\n"
                            "    raise RuntimeError('injected: the ordered stop failed')\n"
                            "machine.Machine._stop_in_order = _failing_stop\n")
    listener = StatusListener(redis_url)
    try:
        machine = machine_factory(HANGING_WORKERS.format(grace="30s"), env=env)
        machine.wait_ready()
        workers = [p.pid for p in machine.processes().values()]
        supervisord = _supervisord_pid(machine)
        machine.signal(signal.SIGTERM)
        assert machine.wait_exit(20) == 1, machine.tail()
        assert machine.event("shutdown.failed"), machine.tail()
        assert not any(pid_alive(p) for p in [*workers, supervisord])
        # nor one that supervisord started again meanwhile (it restarted the workers the stop had ended, and
        # those outlived the machine)
        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if str(machine.state_dir) in " ".join(p.info["cmdline"] or []) and pid_alive(p.pid)]
        assert not left, left
        run = machine.state_dir / "run"
        assert not (run / "supervisor.sock").exists() and not (run / "supervisord.pid").exists()
        wait_for(lambda: listener.got and listener.got[-1] == "shutdown", timeout=5,
                 message=f"a shutdown status message last: {listener.got[-5:]}")
    finally:
        listener.close()


def test_a_supervisorctl_reload_has_every_program_started_again_in_order(machine_factory, redis):
    """`supervisorctl reload` on run/supervisord.conf: the same supervisord, every program stopped and none
    started again (none is autostart); the machine sat with nothing running, /health 503, for good."""
    machine = machine_factory("""
health: {port: 0}
workers:
  sim: {connector: simulation, count: 1}
""")
    machine.wait_ready()
    old = machine.process("worker-0").pid
    machine.control.call("supervisor.restart")  # what `supervisorctl reload` sends
    machine.wait_event("supervisord.reloaded", 30)
    wait_for(lambda: (p := machine.process("worker-0")) and p.state == "RUNNING" and p.pid != old, 30,
             message="the worker running again")
    wait_for(lambda: len([e for e in machine.events() if e.get("message") == "machine_ready"]) == 2, 30,
             message="the machine ready again")
    job = JobStore(redis).submit("simulation", {"steps": 2, "step_ms": 1})
    wait_for(lambda: redis.hget(f"job:{job}", "status") == "completed", 20, message="a job run after the reload")

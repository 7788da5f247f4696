"""A real machine under a real supervisord: boot, drain, restarts with backoff, errored, memory, gating, orphans."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil
import pytest

from _helpers import gated_listener
from harness import pid_alive, wait_for

PY = sys.executable

TWO_WORKERS = """
workers:
  sim:
    connector: simulation
    count: 2
    stop_grace: 5s
"""


def test_boot_then_sigterm_drains_in_order_and_exits_zero(machine_factory):
    machine = machine_factory(TWO_WORKERS)
    machine.wait_ready()
    procs = machine.processes()
    assert {n: p.state for n, p in procs.items()} == {"worker-0": "RUNNING", "worker-1": "RUNNING"}
    pids = [p.pid for p in procs.values()]
    supervisord_pid = int((machine.state_dir / "run" / "supervisord.pid").read_text())
    for name in ("worker-0", "worker-1"):
        wait_for(lambda: '"worker.spawned"' in machine.log_of(name), message=f"{name} to be up")

    machine.signal(signal.SIGTERM)
    assert machine.wait_exit() == 0
    messages = [e.get("message") for e in machine.events()]
    order = ["boot.start", "boot.supervisord", "machine_ready", "shutdown.signal", "shutdown.worker_stopped",
             "shutdown.supervisord", "shutdown.done"]
    assert [m for m in messages if m in order] == order
    assert not any(pid_alive(p) for p in [*pids, supervisord_pid])
    # each worker saw the TERM and stopped on its own (graceful, not killed)
    for name in ("worker-0", "worker-1"):
        assert '"worker.stopped"' in machine.log_of(name)
    assert not (machine.state_dir / "run" / "machine.json").exists()


def test_every_process_gets_only_its_declared_environment(machine_factory):
    machine = machine_factory(f"""
services:
  envdump:
    command: {PY} -c "import json,os,time; print(json.dumps(dict(os.environ)), flush=True); time.sleep(600)"
    port: 7001
    env:
      GREETING: "hello {{index}} on {{port}}"
""", env={"EMP_TEST_LEAK": "must-not-leak", "SOME_SECRET_TOKEN": "abc"})
    machine.wait_ready()
    line = wait_for(lambda: machine.log_of("envdump-0").strip(), message="envdump output")
    env = json.loads(line.splitlines()[0])
    assert env["GREETING"] == "hello 0 on 7001"
    assert env["SERVICE_TYPE"] == "envdump" and env["SERVICE_PORT"] == "7001"
    assert env["MACHINE_ID"].startswith("test-")
    assert "EMP_TEST_LEAK" not in env and "SOME_SECRET_TOKEN" not in env


def test_crash_loop_backs_off_then_errors_then_recovers_after_cooldown(machine_factory, tmp_path):
    starts = tmp_path / "starts"
    machine = machine_factory(f"""
services:
  crasher:
    command: {PY} -c "import sys,time; open('{starts}','a').write(repr(time.time())+chr(10)); sys.exit(3)"
    restart:
      backoff_initial: 100ms
      backoff_factor: 2
      max_restarts: 4
      window: 60s
      cooldown: 3s
""")
    machine.wait_ready()
    row = wait_for(lambda: (r := machine.process("crasher-0")) and r.state == "ERRORED" and r, timeout=15,
                   message="crasher to become ERRORED")
    assert "4 restarts within 60s" in row.errored_reason
    times = [float(t) for t in starts.read_text().split()]
    assert len(times) == 5  # the first start and 4 restarts
    gaps = [b - a for a, b in zip(times, times[1:])]
    # first restart immediate, then 100 ms, 200 ms, 400 ms: each wait at least its backoff, and growing
    for gap, delay in zip(gaps, (0.0, 0.1, 0.2, 0.4)):
        assert gap >= delay * 0.95, gaps
    # growing: 400 ms against 100 ms (one start's own time, ~50-300 ms on a loaded 2-core runner, could
    # invert neighbours 100 ms apart; each gap's floor above already holds every step to its backoff)
    assert gaps[1] < gaps[3], gaps
    assert gaps[0] < 0.5, gaps

    # errored is not FATAL for good: after the cool-down it is tried again
    wait_for(lambda: len(starts.read_text().split()) > 5, timeout=10, message="a start after the cool-down")
    assert machine.event("process.state", process_name="crasher-0", state="ERRORED") is not None


def test_first_restart_after_a_stable_run_is_immediate(machine_factory):
    machine = machine_factory(f"""
services:
  steady:
    command: {PY} -c "import time; time.sleep(600)"
    restart: {{reset_after: 0s}}
""")
    machine.wait_ready()
    old = wait_for(lambda: (p := machine.process("steady-0")) and p.pid and p, message="steady running")
    os.kill(old.pid, signal.SIGKILL)
    killed = time.monotonic()
    new = wait_for(lambda: (p := machine.process("steady-0")) and p.pid not in (0, old.pid) and p, timeout=5,
                   interval=0.005, message="a replacement process")
    assert time.monotonic() - killed < 1.0  # stock supervisord would need up to a full second to notice
    assert new.restarts == 1
    wait_for(lambda: machine.process("steady-0").state == "RUNNING", message="the replacement RUNNING")


# A service holding 200 MiB under a 100 MiB limit, checked every 200 ms.
HOG = f"""
supervisor:
  memory_check_interval: 200ms
services:
  hog:
    command: {PY} -c "x = bytearray(200 * 2**20); import time; time.sleep(600)"
    memory_limit: 100MiB
"""


def test_process_over_its_memory_limit_is_restarted_gracefully(machine_factory):
    machine = machine_factory(HOG)
    machine.wait_ready()
    first = wait_for(lambda: (p := machine.process("hog-0")) and p.pid and p, message="hog running")
    event = machine.wait_event("resource.exhausted", timeout=20, process_name="hog-0")
    assert event["rss_bytes"] > event["limit_bytes"] == 100 * 2**20
    # its telemetry event names the process as the step line does (it said `process`)
    machine.wait_event("resource.exhausted", timeout=5, process_name="hog-0", event_type="resource.exhausted")
    wait_for(lambda: (p := machine.process("hog-0")) and p.pid not in (0, first.pid), timeout=15,
             message="hog restarted with a new pid")
    machine.wait_event("process.restarted", process_name="hog-0")


def test_memory_restarts_back_off_and_too_many_leave_the_process_errored(machine_factory):
    """A limit under a process's working size restarted it every sweep for good (each worker restart handing
    its job back): memory restarts follow its `restart` policy as crashes do (backoff, window, errored)."""
    machine = machine_factory(HOG + "    restart: {max_restarts: 2, window: 10m, backoff_initial: 300ms, "
                                    "reset_after: 10m, cooldown: 10m}\n")
    machine.wait_ready()

    def exhausted() -> list[dict]:  # the machine's log lines (its telemetry event of each has `process`)
        return [e for e in machine.events() if e.get("message") == "resource.exhausted" and "action" in e]

    wait_for(lambda: machine.event("process.errored", process_name="hog-0") or machine._dead("errored"), 40,
             message=f"hog-0 errored after its memory restarts\n{machine.tail()}")
    actions = [(e["action"], e.get("delay_s")) for e in exhausted()]
    assert actions == [("graceful restart", 0.0), ("graceful restart", 0.3), ("errored", None)], actions
    assert "memory over its limit" in exhausted()[-1]["reason"] and "memory_limit" in exhausted()[-1]["hint"]
    row = wait_for(lambda: (p := machine.process("hog-0")) and p.state == "ERRORED" and p, 10,
                   message="hog-0 shown errored")
    assert row.pid == 0 and "memory over its limit" in row.errored_reason and row.restart_in > 60
    assert len(exhausted()) == 3  # left down: no more memory checks of it


def test_a_workers_memory_restart_says_which_worker(machine_factory):
    """A worker's `resource.exhausted` carried its process name only, not the worker id its own records use."""
    machine = machine_factory("""
supervisor:
  memory_check_interval: 200ms
workers:
  sim:
    connector: simulation
    memory_limit: 2MiB
    restart: {max_restarts: 1, window: 10m, cooldown: 10m}
""")
    worker_id = f"test-{machine.state_dir.name}-worker-0"
    step = machine.wait_event("resource.exhausted", timeout=30, process_name="worker-0")
    assert step["worker_id"] == worker_id, step
    machine.wait_event("resource.exhausted", timeout=5, process_name="worker-0", event_type="resource.exhausted",
                       worker_id=worker_id)


def test_worker_bound_to_a_service_starts_only_once_the_service_is_healthy(machine_factory, tmp_path):
    gate, script = gated_listener(tmp_path)
    port = _free_port()
    machine = machine_factory(f"""
services:
  slow:
    command: {PY} {script} {{port}}
    port: {port}
    health: {{tcp: "{{port}}", interval: 100ms, start_period: 30s}}
workers:
  bound:
    connector: simulation
    service: slow
""")
    wait_for(lambda: (p := machine.process("slow-0")) and p.state == "RUNNING", message="service running")
    # The service is up but not healthy: the worker must still be down, across several probe intervals.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert machine.process("worker-0").state == "STOPPED"
        time.sleep(0.1)
    gate.write_text("go")
    opened = time.time()
    machine.wait_ready()
    healthy = machine.event("service.healthy", process_name="slow-0")
    started = machine.event("process.start", process_name="worker-0")
    assert healthy and started
    events = [e for e in machine.events() if e.get("message") in ("service.healthy", "process.start")]
    assert events.index(healthy) < events.index(started)
    assert machine.process("worker-0").start >= int(opened)


def test_sigkill_of_the_machine_leaves_no_orphans(machine_factory):
    machine = machine_factory(TWO_WORKERS + f"""
services:
  stubborn:
    # ignores SIGTERM and has a child of its own: only a group SIGKILL removes both
    command: {PY} -c "import signal,subprocess,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)']); time.sleep(600)"
    stop_grace: 60s
""")
    machine.wait_ready()
    wait_for(lambda: len(psutil.Process(machine.proc.pid).children(recursive=True)) >= 5,
             message="supervisord, two workers, the service and its child")
    everything = [p.pid for p in psutil.Process(machine.proc.pid).children(recursive=True)]
    machine.proc.kill()
    machine.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: not any(pid_alive(p) for p in everything), timeout=10, interval=0.1,
             message=f"all of {everything} to be gone")
    assert time.monotonic() - killed < 10


def test_sigkill_of_the_machine_hands_running_jobs_back_before_the_orphans_are_killed(machine_factory, redis):
    # Orphaned, supervisord gives every process 2 s; the workers drained on their own stop_grace (30 s) and
    # were SIGKILLed before their hand-back: the jobs stayed in_progress until a lease expired elsewhere.
    from emp_machine.runtime.jobs import JobStore
    from emp_machine.supervisor.plugin import ORPHAN_STOP_GRACE

    machine = machine_factory("""
workers:
  sim:
    connector: simulation
    count: 2
    lease: 60s
    stop_grace: 30s
""")
    machine.wait_ready()
    store = JobStore(redis)
    jobs = [store.submit("simulation", {"steps": 1, "step_ms": 0, "hang": True}) for _ in range(2)]
    wait_for(lambda: all(redis.hget(f"job:{j}", "status") == "in_progress" for j in jobs), timeout=15,
             message="both jobs running")
    everything = [p.pid for p in psutil.Process(machine.proc.pid).children(recursive=True)]
    machine.proc.kill()
    machine.proc.wait()
    # supervisord notices within its 1 s poll; the hand-back must land inside the orphan grace after that
    wait_for(lambda: all(redis.hget(f"job:{j}", "status") == "pending" for j in jobs),
             timeout=1 + ORPHAN_STOP_GRACE, interval=0.05, message="both jobs handed back")
    for job_id in jobs:
        job = redis.hgetall(f"job:{job_id}")
        assert (job["retry_count"], job["worker_id"]) == ("0", "")
        assert [e["ev"] for e in store.timeline(job_id).events][-1] == "handed_back"
    wait_for(lambda: not any(pid_alive(p) for p in everything), timeout=10, interval=0.1,
             message=f"all of {everything} to be gone")
    log = (machine.state_dir / "logs" / "supervisord.log").read_text()
    assert "with SIGKILL" not in log  # the workers stopped on their own, after the hand-back
    for key in redis.keys("worker:*"):
        if not key.endswith(":heartbeat"):
            assert redis.hget(key, "status") == "offline", key
    assert not redis.keys("worker:*:heartbeat")


def test_supervisord_lost_is_restarted_once_then_the_machine_gives_up(machine_factory):
    machine = machine_factory(TWO_WORKERS)
    machine.wait_ready()
    pidfile = machine.state_dir / "run" / "supervisord.pid"
    first = int(pidfile.read_text())
    old_workers = {p.pid for p in machine.processes().values()}
    os.kill(first, signal.SIGKILL)
    machine.wait_event("supervisord.lost", action="restart once")
    second = wait_for(lambda: pidfile.exists() and (pid := int(pidfile.read_text() or 0)) != first and pid,
                      timeout=15, message="a new supervisord")
    wait_for(lambda: machine.control.is_up() and all(p.state == "RUNNING" for p in machine.processes().values()),
             timeout=15, message="workers running under the new supervisord")
    assert not any(pid_alive(p) for p in old_workers)  # the orphans of the first one were stopped
    assert not old_workers & {p.pid for p in machine.processes().values()}

    os.kill(second, signal.SIGKILL)
    assert machine.wait_exit(20) == 1
    assert machine.event("supervisord.lost", action="exit")


def test_second_signal_stops_at_once(machine_factory):
    machine = machine_factory(f"""
services:
  stubborn:
    command: {PY} -c "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    stop_grace: 60s
""")
    machine.wait_ready()
    pid = machine.process("stubborn-0").pid
    machine.signal(signal.SIGTERM)
    machine.wait_event("shutdown.drain")
    machine.signal(signal.SIGINT)
    assert machine.wait_exit(10) == 1
    wait_for(lambda: not pid_alive(pid), timeout=5, message="the stubborn service to be killed")


def test_ps_restart_and_logs_against_a_running_machine(machine_factory):
    machine = machine_factory(TWO_WORKERS)
    machine.wait_ready()
    ps = machine.cli("ps", "--json")
    assert ps.returncode == 0, ps.stderr
    table = {row["name"]: row for row in json.loads(ps.stdout)["processes"]}
    assert set(table) == {"worker-0", "worker-1"}
    assert all(row["state"] == "running" and row["pid"] and row["memory_bytes"] > 0 for row in table.values())
    old_pid = table["worker-0"]["pid"]

    human = machine.cli("ps")
    assert "worker-0" in human.stdout and "RESTARTS" in human.stdout

    restarted = machine.cli("restart", "worker-0")
    assert restarted.returncode == 0, restarted.stderr
    after = machine.process("worker-0")
    assert after.pid != old_pid and after.state == "RUNNING" and after.restarts == 1

    logs = machine.cli("logs", "worker-0", "-n", "2")
    assert logs.returncode == 0
    lines = logs.stdout.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["worker_id"].endswith("worker-0") for line in lines)

    unknown = machine.cli("restart", "worker-9")
    assert unknown.returncode == 1 and "no process named worker-9; did you mean worker-" in unknown.stderr
    missing_log = machine.cli("logs", "nope")
    assert missing_log.returncode == 1 and "worker-0" in missing_log.stderr


def test_operator_commands_say_clearly_when_no_machine_runs(tmp_path):
    import subprocess

    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"machine: {{type: test, state_dir: {tmp_path / 'state'}}}\n")
    for args in (["ps"], ["restart", "all"], ["logs", "worker-0"]):
        done = subprocess.run([PY, "-m", "emp_machine", *args, "--manifest", str(manifest)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1
        assert "no machine is running" in done.stderr and "Traceback" not in done.stderr


def test_embedded_redis_is_supervised_and_workers_wait_for_it(machine_factory):
    import redis as redis_lib

    machine = machine_factory(TWO_WORKERS, redis_url="embedded")
    machine.wait_ready()
    procs = machine.processes()
    assert procs["redis"].state == "RUNNING"
    server = psutil.Process(procs["redis"].pid)
    # net_connections() is psutil 6's name for connections() (pyproject allows 5.9)
    port = next(c.laddr.port for c in (getattr(server, "net_connections", None) or server.connections)()
                if c.status == psutil.CONN_LISTEN)
    client = redis_lib.Redis(host="127.0.0.1", port=port)
    assert client.ping()
    client.close()
    events = [e.get("message") + ":" + str(e.get("process_name")) for e in machine.events()]
    assert events.index("service.healthy:redis") < events.index("process.start:worker-0")
    env = (machine.state_dir / "run" / "supervisord.conf").read_text()
    assert f'REDIS_URL="redis://127.0.0.1:{port}/0"' in env
    # a clean stop stops it last, after the last status message: no warning that it went away (every stop said
    # `redis.unreachable`)
    machine.signal(signal.SIGTERM)
    assert machine.wait_exit(40) == 0
    assert machine.event("shutdown.redis_stopped") and machine.event("redis.unreachable") is None


def _free_port() -> int:
    from emp_machine.runtime.redis_server import free_port

    return free_port()


@pytest.fixture(autouse=True)
def _no_stray_supervisord_after(request, tmp_path_factory):
    """Every test in this module must leave no supervisord of its own behind (its own: one whose config is
    under this session's temporary folder, not another test session's)."""
    ours = (str(tmp_path_factory.getbasetemp()), os.environ["XDG_STATE_HOME"])  # see conftest.py
    before = {p.pid for p in psutil.process_iter() if _is_supervisord(p, ours)}
    yield
    wait_for(lambda: not ({p.pid for p in psutil.process_iter() if _is_supervisord(p, ours)} - before), timeout=15,
             message="no stray supervisord")


def _is_supervisord(proc: psutil.Process, under: tuple[str, ...]) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "supervisor.supervisord" in cmdline and any(folder in cmdline for folder in under)


def test_the_running_machine_process_does_not_load_pydantic(machine_factory):
    """Validation happens before the exec into the lean runner: pydantic stays out of the machine's memory."""
    machine = machine_factory(TWO_WORKERS)
    machine.wait_ready()
    libraries = {m.path for m in psutil.Process(machine.proc.pid).memory_maps()}
    assert not [p for p in libraries if "pydantic_core" in p]
    assert any("_sqlite3" in p for p in libraries)  # the check can see extension modules at all
    assert psutil.Process(machine.proc.pid).cmdline()[3] == "machine-run"  # same pid, replaced by exec


# -- what mutation audit M7 found unpinned: each rule below could be broken with every other test passing ----

def _stamps(path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def test_memory_restarts_count_the_children_wait_their_backoff_and_follow_reset_after(machine_factory, tmp_path):
    """`tree` holds its memory in a child (the limit is the process tree's, README), under `policy: never`
    (a memory restart restarts all the same) with a 3 s backoff: restarts at 0 s, then after a real 3 s wait.
    `late` grows past its limit 2.5 s into each run, past its reset_after of 1 s: each memory restart is
    immediate, as after any stable run."""
    tree, late = tmp_path / "tree", tmp_path / "late"
    child = "x = bytearray(150 * 2**20); import time; time.sleep(600)"
    machine = machine_factory(f"""
supervisor:
  memory_check_interval: 200ms
services:
  tree:
    command: {PY} -c "import subprocess, sys, time; open('{tree}', 'a').write(repr(time.time()) + chr(10)); subprocess.Popen([sys.executable, '-c', '{child}']); time.sleep(600)"
    memory_limit: 100MiB
    restart: {{policy: never, max_restarts: 5, window: 10m, backoff_initial: 3s, reset_after: 10m, cooldown: 10m}}
  late:
    command: {PY} -c "import time; open('{late}', 'a').write(repr(time.time()) + chr(10)); time.sleep(2.5); x = bytearray(150 * 2**20); time.sleep(600)"
    memory_limit: 100MiB
    restart: {{max_restarts: 5, window: 10m, backoff_initial: 5s, reset_after: 1s, cooldown: 10m}}
""")
    machine.wait_ready()

    def exhausted(name) -> list[dict]:
        return [e for e in machine.events()
                if e.get("message") == "resource.exhausted" and "action" in e and e.get("process_name") == name]

    def tree_memory() -> int:  # `ps` shows the process tree's memory, as the limit counts it
        rows = json.loads(machine.cli("ps", "--json").stdout)["processes"]
        return next(row["memory_bytes"] for row in rows if row["name"] == "tree-0") or 0

    wait_for(lambda: tree_memory() > 120 * 2**20, 30, message="ps to count the child's 150 MiB")
    wait_for(lambda: len(_stamps(tree)) >= 3 and len(_stamps(late)) >= 3, 60,
             message=f"two memory restarts of each\n{machine.tail()}")
    assert [(e["action"], e["delay_s"]) for e in exhausted("tree-0")][:2] == [("graceful restart", 0.0),
                                                                              ("graceful restart", 3.0)]
    assert exhausted("tree-0")[0]["rss_bytes"] > 100 * 2**20
    starts = _stamps(tree)
    assert starts[2] - starts[1] >= 3.0, starts  # the backoff was waited, not only reported
    assert [(e["action"], e["delay_s"]) for e in exhausted("late-0")][:2] == [("graceful restart", 0.0),
                                                                              ("graceful restart", 0.0)]


def test_restart_policy_ps_and_drain_as_promised(machine_factory, tmp_path):
    """One machine, several promises: a crash after a stable run (past reset_after) restarts at once after a
    crash loop's backoff; `on-failure` leaves a clean exit down; each worker runs its own group's job types
    (WORKER_GROUP); `ps` shows each process's restarts and uptime; a service's stop_grace reaches supervisord;
    the drain stops workers before services."""
    flaky, once = tmp_path / "flaky", tmp_path / "once"
    script = tmp_path / "flaky.py"
    script.write_text(f"""import sys, time
open({str(flaky)!r}, 'a').write(repr(time.time()) + chr(10))
n = len(open({str(flaky)!r}).read().split())
if n == 3:
    time.sleep(1.5)  # a stable run: past reset_after
if n >= 5:
    time.sleep(600)
sys.exit(3)
""")
    machine = machine_factory(f"""
services:
  flaky:
    command: {PY} {script}
    restart: {{backoff_initial: 2s, backoff_factor: 1, reset_after: 1s, max_restarts: 20, window: 10m}}
  once:
    command: {PY} -c "import time; open('{once}', 'a').write(repr(time.time()) + chr(10)); time.sleep(0.3)"
    restart: {{policy: on-failure, backoff_initial: 0s}}
  stubborn:
    command: {PY} -c "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    stop_grace: 2s
workers:
  alpha:
    connector: simulation
    job_types: [alpha-job]
  beta:
    connector: simulation
    job_types: [beta-job]
""")
    machine.wait_ready()
    wait_for(lambda: len(_stamps(flaky)) >= 4, 30, message=f"four starts of flaky\n{machine.tail()}")
    starts = _stamps(flaky)
    assert starts[2] - starts[1] >= 1.9, starts  # the crash loop's backoff (2 s)
    assert starts[3] - starts[2] < 1.5 + 1.0, starts  # after the stable run: at once, not 2 s more

    for name, types in (("worker-0", ["alpha-job"]), ("worker-1", ["beta-job"])):
        spawned = wait_for(lambda: [json.loads(line) for line in machine.log_of(name).splitlines()
                                    if '"worker.spawned"' in line], 20, message=f"{name} spawned")
        assert spawned[0]["job_types"] == types, spawned

    assert machine.cli("restart", "worker-0").returncode == 0
    ps = machine.cli("ps", "--json")
    table = {row["name"]: row for row in json.loads(ps.stdout)["processes"]}
    assert (table["worker-0"]["restarts"], table["worker-1"]["restarts"]) == (1, 0), table
    assert table["worker-1"]["uptime_s"] >= 3 and table["worker-0"]["uptime_s"] < table["worker-1"]["uptime_s"]

    # once-0 ended well at boot, seconds ago (a restart with no backoff would have come at once)
    assert len(_stamps(once)) == 1 and machine.process("once-0").restarts == 0

    conf = (machine.state_dir / "run" / "supervisord.conf").read_text()
    section = conf.split("[program:stubborn-0]", 1)[1].split("\n[", 1)[0]
    assert "stopwaitsecs = 2\n" in section or "stopwaitsecs=2\n" in section, section
    began = time.monotonic()
    machine.signal(signal.SIGTERM)
    assert machine.wait_exit(30) == 0
    assert time.monotonic() - began < 15  # stubborn SIGKILLed after its 2 s grace, not supervisord's default 30 s
    messages = [e.get("message") for e in machine.events()]
    order = ["shutdown.worker_stopped", "shutdown.service_stopped", "shutdown.done"]
    assert [m for m in messages if m in order] == order, messages

"""`restart` and `logs` as PM2's: a service or worker-group name covers every instance, logs stay readable
after the machine stopped, and no restart while the machine drains. Real machines, real supervisord."""

from __future__ import annotations

import signal
import subprocess
import sys

from harness import wait_for

PY = sys.executable

CHATTY = """
services:
  chatty:
    command: {py} -c "import os,time,itertools; [print(os.environ['SERVICE_INDEX'], 'line', i, flush=True) or time.sleep(0.05) for i in itertools.count()]"
    instances: 2
workers:
  sim:
    connector: simulation
    count: 2
    stop_grace: 5s
"""


def _follow(machine, tmp_path, *args):
    """`emp-machine logs ... -f` in the background, its output in a file (read while it runs)."""
    out = tmp_path / f"follow-{len(list(tmp_path.glob('follow-*')))}.out"
    fh = open(out, "wb")
    proc = subprocess.Popen([PY, "-m", "emp_machine", "logs", *args, "-f", "--manifest", str(machine.manifest)],
                            stdout=fh, stderr=subprocess.STDOUT, env=machine.env)
    return proc, fh, out


def _stop(proc, fh) -> None:
    proc.terminate()
    proc.wait(10)
    fh.close()


def test_restart_and_logs_take_a_service_or_worker_group_name(machine_factory, tmp_path):
    machine = machine_factory(CHATTY.format(py=PY))
    machine.wait_ready()
    for name in ("chatty-0", "chatty-1"):
        wait_for(lambda: "line 1\n" in machine.log_of(name), message=f"{name} output")
    before = {name: row.pid for name, row in machine.processes().items()}

    service = machine.cli("restart", "chatty")
    assert service.returncode == 0, service.stderr
    assert service.stdout.split("\n")[:2] == ["restarted chatty-0", "restarted chatty-1"]
    group = machine.cli("restart", "sim")
    assert group.returncode == 0, group.stderr
    assert group.stdout.split("\n")[:2] == ["restarted worker-0", "restarted worker-1"]
    after = machine.processes()
    assert all(after[n].pid != before[n] and after[n].state == "RUNNING" for n in before), after
    one = machine.cli("restart", "chatty-1")  # an exact process name: that one alone
    assert one.returncode == 0 and one.stdout.strip() == "restarted chatty-1", one.stderr
    assert machine.process("chatty-0").pid == after["chatty-0"].pid
    unknown = machine.cli("restart", "nope")
    assert unknown.returncode == 1 and "no process named nope" in unknown.stderr
    assert "services and worker groups: chatty, sim" in unknown.stderr and "Traceback" not in unknown.stderr

    tail = machine.cli("logs", "chatty", "-n", "2")
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    assert lines[0].startswith("==> chatty-0: ") and lines[3].startswith("==> chatty-1: "), lines
    assert all(line.startswith("chatty-0 | 0 line ") for line in lines[1:3]), lines
    assert all(line.startswith("chatty-1 | 1 line ") for line in lines[4:6]), lines
    assert len(lines) == 6
    single = machine.cli("logs", "chatty-1", "-n", "1")  # an exact name: its lines as they are
    assert single.returncode == 0 and single.stdout.startswith("1 line "), single.stdout

    proc, fh, out = _follow(machine, tmp_path, "chatty", "-n", "0")
    try:  # both instances' new lines, interleaved, each whole and prefixed
        wait_for(lambda: "chatty-0 | 0 line" in out.read_text() and "chatty-1 | 1 line" in out.read_text(),
                 timeout=15, message=f"both instances followed\n{out.read_text()[-2000:]}")
    finally:
        _stop(proc, fh)
    followed = [line for line in out.read_text().splitlines() if line.strip()]
    assert all(line.startswith(("chatty-0 | 0 line ", "chatty-1 | 1 line ")) for line in followed), followed[:5]


def test_logs_are_readable_and_followed_after_the_machine_stopped(machine_factory, tmp_path):
    machine = machine_factory(CHATTY.format(py=PY))
    machine.wait_ready()
    wait_for(lambda: "line 2\n" in machine.log_of("chatty-1"), message="chatty-1 output")
    for name in ("worker-0", "worker-1"):
        wait_for(lambda: '"worker.spawned"' in machine.log_of(name), message=f"{name} up")
    machine.signal(signal.SIGTERM)
    assert machine.wait_exit(40) == 0
    last = machine.log_of("chatty-0").splitlines()[-1]

    shown = machine.cli("logs", "chatty-0", "-n", "1")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [last]
    assert "no machine is running" in shown.stderr and str(machine.state_dir / "logs") in shown.stderr
    assert f"the log files of the machine of {machine.manifest} in" in shown.stderr, shown.stderr  # whose logs these are
    group = machine.cli("logs", "sim", "-n", "1")  # group names too, from the manifest the machine ran
    assert group.returncode == 0, group.stderr
    assert [line.split(" | ")[0] for line in group.stdout.splitlines() if not line.startswith("==>")] == [
        "worker-0", "worker-1"]
    missing = machine.cli("logs", "nope")
    assert missing.returncode == 1 and "no log for nope" in missing.stderr and "chatty-0" in missing.stderr

    proc, fh, out = _follow(machine, tmp_path, "chatty-0", "-n", "1")
    try:  # the file as it is, then what is appended (a machine started again writes there)
        wait_for(lambda: last in out.read_text(), message=f"the last line\n{out.read_text()}")
        with open(machine.state_dir / "logs" / "chatty-0.log", "a", encoding="utf-8") as log:
            log.write("appended after the stop\n")
        wait_for(lambda: "appended after the stop" in out.read_text(), message=f"the new line\n{out.read_text()}")
    finally:
        _stop(proc, fh)


def test_restart_is_refused_while_the_machine_drains(machine_factory):
    machine = machine_factory(f"""
services:
  stubborn:
    command: {PY} -c "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    stop_grace: 8s
workers:
  sim:
    connector: simulation
    stop_grace: 2s
""")
    machine.wait_ready()
    wait_for(lambda: '"worker.spawned"' in machine.log_of("worker-0"), message="worker-0 up")
    machine.signal(signal.SIGTERM)
    machine.wait_event("shutdown.worker_stopped")  # the stubborn service holds the drain for its grace
    for args in (["restart", "worker-0"], ["restart", "sim"], ["restart", "all"]):
        refused = machine.cli(*args)
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
        assert "the machine is draining" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert not refused.stdout.strip()
    assert machine.process("worker-0").state == "STOPPED"
    assert machine.wait_exit(40) == 0


# A service instance that, when told to stop, waits (up to its bound) for the other instance of its group to be
# told too; it writes down whether they met. Its pid file names the instance that runs now.
PAIR = """
import os, pathlib, signal, sys, time
folder, bound = pathlib.Path(sys.argv[1]), float(sys.argv[2])
me = os.environ["SERVICE_TYPE"] + "-" + os.environ["SERVICE_INDEX"]
other = os.environ["SERVICE_TYPE"] + "-" + str(1 - int(os.environ["SERVICE_INDEX"]))
(folder / f"pid-{me}").write_text(str(os.getpid()))

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

def on_term(*_):
    (folder / f"stopping-{me}-{os.getpid()}").touch()
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        pid = (folder / f"pid-{other}").read_text()  # (the last one's, until a new one has written its own)
        # (the other may have met this one and exited already)
        if (folder / f"stopping-{other}-{pid}").exists() and (alive(int(pid)) or (folder / f"met-{other}").exists()):
            (folder / f"met-{me}").touch()
            sys.exit(0)
        time.sleep(0.02)
    (folder / f"alone-{me}").touch()
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(1)
"""


def test_restart_stops_a_group_at_once_and_reload_one_at_a_time(machine_factory, tmp_path):
    """`restart` as `pm2 restart`: every instance told to stop at once (a group of busy workers is back after one
    grace, not one grace per instance); `reload` as `pm2 reload`: one at a time, the others keep working."""
    script = tmp_path / "pair.py"
    script.write_text(PAIR)
    marks = tmp_path / "marks"
    marks.mkdir()
    machine = machine_factory(f"""
services:
  meet:
    command: {PY} {script} {marks} 20
    instances: 2
    stop_grace: 30s
  roll:
    command: {PY} {script} {marks} 1
    instances: 2
    stop_grace: 30s
workers:
  sim:
    connector: simulation
""")
    machine.wait_ready()
    for name in ("meet-0", "meet-1", "roll-0", "roll-1"):
        wait_for(lambda: (marks / f"pid-{name}").exists(), message=f"{name} up")
    before = {name: row.pid for name, row in machine.processes().items()}

    restarted = machine.cli("restart", "meet", timeout=60)
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.split("\n")[:2] == ["restarted meet-0", "restarted meet-1"]
    # Each was told while the other was stopping too (one at a time, the first would wait out its 20 s alone).
    assert (marks / "met-meet-0").exists() and (marks / "met-meet-1").exists(), sorted(p.name for p in marks.iterdir())

    reloaded = machine.cli("reload", "roll", timeout=60)
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.split("\n")[:2] == ["restarted roll-0", "restarted roll-1"]
    # Neither was told while the other was: each waited out its second alone, then the next was told.
    assert (marks / "alone-roll-0").exists() and (marks / "alone-roll-1").exists(), sorted(
        p.name for p in marks.iterdir())
    assert not list(marks.glob("met-roll-*"))
    after = machine.processes()
    assert all(after[n].pid != before[n] and after[n].state == "RUNNING" for n in ("meet-0", "meet-1", "roll-0",
                                                                                 "roll-1")), after
    assert after["worker-0"].pid == before["worker-0"]

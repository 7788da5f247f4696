"""Machine status in Redis: the contract's message, periodic rhythm, event-driven transitions, Redis outage."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import psutil
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.redis_server import PrivateRedis
from harness import health_base, http, http_json, wait_for
from status_shape import check_status_message


class Listener:
    """Collects (receipt time, channel, message) from a pattern subscription in a thread."""

    def __init__(self, url: str, *patterns: str):
        self.client = redis_lib.Redis.from_url(url, decode_responses=True)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(*patterns)
        self.got: list[tuple[float, str, dict]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                msg = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            except (redis_lib.ConnectionError, OSError, ValueError):
                return
            if msg and msg["type"] == "pmessage":
                self.got.append((time.monotonic(), msg["channel"], json.loads(msg["data"])))

    def status(self, update_type: str | None = None) -> list[tuple[float, dict]]:
        return [(t, m) for t, c, m in list(self.got) if c.startswith("machine:status:")
                and (update_type is None or m["update_type"] == update_type)]

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        try:
            self.pubsub.close()
            self.client.close()
        except Exception:
            pass


def test_status_messages_follow_the_contract_with_periodic_rhythm_and_fast_transitions(machine_factory, redis,
                                                                                        redis_url):
    listener = Listener(redis_url, "machine:status:*", "worker_status")
    try:
        machine = machine_factory("""
health: {port: 0}
status: {interval: 600ms}
workers:
  sim:
    connector: simulation
    count: 2
    stop_grace: 5s
""")
        machine.wait_ready()
        ready = wait_for(lambda: listener.status("machine_ready"), 10, message="a machine_ready message")
        _, msg = ready[0]
        mid = msg["machine_id"]
        workers = [f"{mid}-worker-0", f"{mid}-worker-1"]
        check_status_message(msg, mid, workers)
        assert msg["status"]["machine"]["phase"] == "ready"
        assert msg["health_url"] == f"http://{__import__('socket').gethostname()}:{health_base(machine).rsplit(':', 1)[1]}"
        wait_for(lambda: any(all(w["is_connected"] for w in m["status"]["workers"].values())
                             for _, m in listener.status()), 10, message="both workers connected")

        JobStore(redis).submit("simulation", {"steps": 8, "step_ms": 100})
        busy_at = wait_for(lambda: next((t for t, c, m in list(listener.got) if c == "worker_status"
                                         and m["new_status"] == "busy"), None), 10, message="worker_status busy")
        seen = wait_for(lambda: next(((t, m) for t, m in listener.status("event_driven") if t >= busy_at and any(
            w["status"] == "busy" and w["current_job_id"] for w in m["status"]["workers"].values())), None),
            3, message="an event_driven message showing the busy worker")
        assert seen[0] - busy_at < 1.0, f"transition reached Redis after {seen[0] - busy_at:.3f}s"
        check_status_message(seen[1], mid, workers)
        idle_at = wait_for(lambda: next((t for t, c, m in list(listener.got) if c == "worker_status"
                                         and m["new_status"] == "idle" and t > busy_at), None), 10,
                           message="worker_status idle")
        wait_for(lambda: any(t >= idle_at and all(w["status"] == "idle" for w in m["status"]["workers"].values())
                             for t, m in listener.status("event_driven")), 1.5, message="event_driven idle")

        # periodic messages keep their rhythm although event-driven ones went out in between
        wait_for(lambda: len(listener.status("periodic")) >= 6, 10, message="six periodic messages")
        stamps = [m["timestamp"] for _, m in listener.status("periodic")]
        gaps = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]
        assert all(0.4 <= g <= 0.9 for g in gaps), gaps
        assert abs(sum(gaps) / len(gaps) - 0.6) < 0.1, gaps
        for _, m in listener.status():
            check_status_message(m, mid, workers)

        machine.signal(signal.SIGTERM)
        assert machine.wait_exit() == 0
        last = wait_for(lambda: listener.status("shutdown"), 5, message="a shutdown message")
        assert len(last) == 1 and last[0][1]["status"]["machine"]["phase"] == "shutdown"
        assert listener.status()[-1][1]["update_type"] == "shutdown"  # nothing after it
    finally:
        listener.close()


def test_redis_outage_keeps_the_machine_up_and_publishing_resumes_with_a_full_status(machine_factory, tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        machine = machine_factory("""
health: {port: 0}
status: {interval: 5s}
workers:
  sim:
    connector: simulation
    count: 1
    lease: 3s
    stop_grace: 5s
""", redis_url=server.url)
        machine.wait_ready()
        base = health_base(machine)
        wait_for(lambda: http(base + "/health")[0] == 200, 15, message="/health 200")
        mid = json.loads(http(base + "/status")[2])["machine_id"]

        server.stop()
        status, doc = wait_for(lambda: (r := http_json(base + "/health"))[0] == 503 and r, 5,
                               message="/health 503 with Redis down")
        assert doc["components"]["redis"]["healthy"] is False and doc["components"]["redis"]["reason"]
        assert any(r.startswith("redis:") for r in doc["reasons"])
        assert http(base + "/ready")[0] == 200 and machine.proc.poll() is None
        machine.wait_event("redis.unreachable")

        server.start(server.port)  # the same address, empty data
        listener = Listener(server.url, "machine:status:*")
        try:
            restarted = time.monotonic()
            got = wait_for(lambda: listener.status(), 3, message="a status message after Redis came back")
            assert got[0][0] - restarted < 3.0
            check_status_message(got[0][1], mid, [f"{mid}-worker-0"])
            assert got[0][1]["update_type"] == "event_driven"
            wait_for(lambda: http(base + "/health")[0] == 200, 10, message="/health 200 after Redis is back")
            machine.wait_event("redis.reachable")
            if machine.event("status.publish_failed") is not None:  # a periodic fell inside the outage
                machine.wait_event("status.publish_resumed")
        finally:
            listener.close()
    finally:
        server.stop()


def test_a_shutdown_message_that_cannot_be_sent_is_said_so(machine_factory, tmp_path):
    # A machine stopped while its Redis is down cannot tell the monitor it stopped; the publisher warns once
    # per failing spell, so a spell that began before the stop left the lost shutdown message unmentioned.
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        machine = machine_factory("""
health: {port: 0}
workers:
  sim:
    connector: simulation
    count: 2
    stop_grace: 3s
""", redis_url=server.url)
        machine.wait_ready()
        server.stop()
        machine.wait_event("redis.unreachable")
        machine.signal(signal.SIGTERM)
        assert machine.wait_exit(30) == 0, machine.tail()
        assert machine.event("status.shutdown_unsent", level="warning"), machine.tail()
        # the workers could not go offline either, and the machine does not try each in turn: one try, said
        assert [e.get("process_name") for e in machine.events()
                if e.get("message") == "shutdown.worker_settle_failed"] == ["worker-0"], machine.tail()
    finally:
        server.stop()


# One worker whose first crash is restarted and second leaves it errored (down for its 10 min cool-down).
ONE_WORKER_ERRORED_AT_ITS_SECOND_CRASH = """
workers:
  sim:
    connector: simulation
    count: 1
    restart: {max_restarts: 1, window: 10m, cooldown: 10m, reset_after: 10m}
"""


def test_a_worker_that_stays_down_is_marked_offline_for_it(machine_factory, redis):
    """A SIGKILLed worker cannot announce itself offline; once it stays down (here: errored) the machine does."""
    import os
    import signal

    machine = machine_factory(ONE_WORKER_ERRORED_AT_ITS_SECOND_CRASH)
    machine.wait_ready()
    worker_id = f"test-{machine.state_dir.name}-worker-0"
    wait_for(lambda: redis.hget(f"worker:{worker_id}", "status") == "idle", timeout=20,
             message="the worker registered as idle")
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("worker_status")
    killed: set[int] = set()
    for round_ in range(2):  # the first kill is restarted, the second exceeds the window: errored, left down
        pid = wait_for(lambda: (p := machine.process("worker-0")) and p.state == "RUNNING"
                       and p.pid not in killed and p.pid, timeout=20, message="worker-0 running (a new pid)")
        wait_for(lambda: machine.log_of("worker-0").count('"worker.spawned"') > round_, timeout=20,
                 message="the worker (re)started and registered")
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    wait_for(lambda: machine.process("worker-0").state == "ERRORED", timeout=20, message="worker-0 errored")
    wait_for(lambda: redis.hget(f"worker:{worker_id}", "status") == "offline", timeout=10,
             message="worker marked offline in Redis")
    assert not redis.exists(f"worker:{worker_id}:heartbeat")
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(m.get("new_status") == "offline" for m in seen):
        msg = pubsub.get_message(timeout=0.2)
        if msg:
            seen.append(json.loads(msg["data"]))
    pubsub.close()
    offline = [m for m in seen if m.get("new_status") == "offline"]
    assert offline and offline[0]["worker_id"] == worker_id and offline[0]["old_status"] == "idle"
    # The machine logs the step after its Redis write (the state and the message seen above): wait for it.
    assert machine.wait_event("worker.offline", process_name="worker-0")


def test_machine_ready_and_shutdown_messages_carry_supervisords_table_of_that_moment(machine_factory, redis_url):
    """machine_ready goes out right after supervisord started the workers, shutdown right after it stopped them:
    neither may repeat the last 1 s sweep (stopped at ready, online at shutdown: what the API would store)."""
    listener = Listener(redis_url, "machine:status:*")
    try:
        machine = machine_factory("""
status: {interval: 10s}
workers:
  sim:
    connector: simulation
    count: 2
    stop_grace: 5s
""")
        machine.wait_ready()
        _, ready = wait_for(lambda: listener.status("machine_ready"), 10, message="a machine_ready message")[0]
        assert ready["status"]["services"], ready
        for key, svc in ready["status"]["services"].items():
            assert svc["pm2_status"] == "online" and svc["status"] == "active", (key, svc)

        machine.signal(signal.SIGTERM)
        assert machine.wait_exit() == 0
        _, last = wait_for(lambda: listener.status("shutdown"), 5, message="a shutdown message")[0]
        mid = ready["machine_id"]
        # the shape in full: the loops below check nothing on a message that lists no service or worker
        check_status_message(last, mid, [f"{mid}-worker-0", f"{mid}-worker-1"])
        assert last["status"]["services"] and last["status"]["workers"], last
        for key, svc in last["status"]["services"].items():
            assert svc["pm2_status"] == "stopped" and svc["status"] == "inactive", (key, svc)
        for wid, w in last["status"]["workers"].items():
            assert w["status"] == "offline" and w["is_connected"] is False, (wid, w)
    finally:
        listener.close()


def test_shutdown_message_with_supervisord_gone_does_not_repeat_a_stale_online(machine_factory, redis, redis_url):
    """supervisord killed while the machine drains: its table cannot be read, and the shutdown message must not
    show the worker as the last sweep saw it (running, busy); the machine logs why it could not read it. The
    worker it ran is the machine's now (the subreaper): stopped as supervisord would have, within its grace, its
    running job handed back, and the machine exits (it used to hang for good when supervisord was reaped first)."""
    import os

    listener = Listener(redis_url, "machine:status:*")
    worker_pid = 0
    try:
        machine = machine_factory(f"""
status: {{interval: 10s}}
services:
  idle:
    command: {sys.executable} -c "import time; time.sleep(600)"
    stop_grace: 6s
workers:
  sim:
    connector: simulation
    count: 1
    stop_grace: 6s
""")
        machine.wait_ready()
        worker_pid = wait_for(lambda: (p := machine.process("worker-0")) and p.state == "RUNNING" and p.pid, 10,
                              message="worker-0 running")
        job = JobStore(redis).submit("simulation", {"steps": 600, "step_ms": 100})
        wait_for(lambda: redis.hget(f"job:{job}", "status") == "in_progress", 15, message="the job running")
        wait_for(lambda: any(w["status"] == "busy" for _, m in listener.status() for w in m["status"]["workers"]
                             .values()), 10, message="a status message showing the busy worker")
        machine.signal(signal.SIGTERM)
        machine.wait_event("shutdown.drain")
        supervisord_pid = int((machine.state_dir / "run" / "supervisord.pid").read_text())
        os.kill(supervisord_pid, signal.SIGKILL)
        assert machine.wait_exit() == 0, machine.tail()
        _, last = wait_for(lambda: listener.status("shutdown"), 5, message="a shutdown message")[0]
        check_status_message(last, last["machine_id"], [f"{last['machine_id']}-worker-0"])
        assert last["status"]["services"] and last["status"]["workers"], last
        for key, svc in last["status"]["services"].items():
            assert svc["pm2_status"] != "online" and svc["status"] == "inactive", (key, svc)
        for wid, w in last["status"]["workers"].items():
            assert w["status"] == "offline" and w["is_connected"] is False, (wid, w)
        assert machine.event("status.processes_unknown", update_type="shutdown"), machine.tail()
        assert machine.event("shutdown.worker_stopped", direct=True), machine.tail()
        # the next tier too, though supervisord's exit was seen by then
        assert machine.event("shutdown.service_stopped", direct=True), machine.tail()
        assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
        assert redis.hget(f"job:{job}", "status") == "pending", redis.hgetall(f"job:{job}")  # handed back
        assert not (machine.state_dir / "run" / "supervisord.pid").exists()  # the killed one's run files
    finally:
        listener.close()
        if worker_pid:  # should the machine have left it running
            try:
                os.kill(worker_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- health_url: where the monitor (and `emp-machine errors --machine ID`) reaches the machine --------------
RAILWAY = {"RAILWAY_PRIVATE_DOMAIN": "sim.railway.internal", "RAILWAY_REPLICA_ID": "aaaaaaaa-1111",
           "RAILWAY_SERVICE_NAME": "sim"}


def test_health_url_prefers_a_public_url_then_a_bound_address_then_railways_private_domain():
    import socket

    from emp_machine.runtime.status import health_url

    # the manifest's public_url, or Railway's public domain (manifest.load turns it into public_url): from anywhere
    assert health_url("https://sim-production.up.railway.app/", "0.0.0.0", 8080, RAILWAY) == \
        "https://sim-production.up.railway.app"
    # a server bound to one address is reached there
    assert health_url("", "10.1.2.3", 8080, RAILWAY) == "http://10.1.2.3:8080"
    # no public domain on Railway: the private domain (the project's services, the monitor among them, resolve
    # it), not the container's random host name that nothing else resolves
    for wildcard in ("0.0.0.0", "::", ""):
        assert health_url("", wildcard, 8080, RAILWAY) == "http://sim.railway.internal:8080"
    assert health_url("", "0.0.0.0", 8080, {"RAILWAY_PRIVATE_DOMAIN": " sim.railway.internal/ "}) == \
        "http://sim.railway.internal:8080"
    # elsewhere: this host's name, never loopback
    assert health_url("", "0.0.0.0", 8080, {}) == f"http://{socket.gethostname()}:8080"
    assert health_url("", "127.0.0.1", 8080, {"RAILWAY_PRIVATE_DOMAIN": ""}) == f"http://{socket.gethostname()}:8080"


def test_a_machine_on_railways_private_network_publishes_its_private_domain(machine_factory):
    machine = machine_factory("""
workers:
  sim:
    connector: simulation
    count: 1
""", env=RAILWAY)
    listening = machine.wait_event("health.listening")
    port = health_base(machine).rsplit(":", 1)[1]
    assert listening["health_url"] == f"http://sim.railway.internal:{port}", listening


class _ErroringRedis:
    """A TCP server on a Redis's address that answers every command with an error, as a Redis refusing writes
    does (OOM, a failed replica): it counts the commands with `needle` and `offline` among their arguments
    (the machine's offline marks of one worker). Only what a client needs: RESP arrays of bulk strings in,
    one error line out per command."""

    def __init__(self, port: int, needle: bytes):
        import socket

        self.needle, self.count, self._stop, self.conns = needle, 0, False, []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        reader = conn.makefile("rb")
        try:
            while not self._stop:
                head = reader.readline()
                if not head.startswith(b"*"):
                    return
                args = []
                for _ in range(int(head[1:])):
                    size = int(reader.readline()[1:])
                    args.append(reader.read(size + 2)[:-2])
                if self.needle in args and b"offline" in args:  # whole arguments: not a status message's JSON
                    self.count += 1
                conn.sendall(b"-ERR test: this Redis refuses every command\r\n")
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self.thread.join(5)
        for conn in self.conns:  # the port is free for the real server again
            try:
                conn.shutdown(2)
            except OSError:
                pass
            conn.close()


def test_a_worker_offline_mark_failing_each_sweep_is_reported_once(machine_factory, tmp_path):
    """While Redis refuses the offline mark of a worker that stays down, the machine tries again each sweep and
    says `worker.offline_failed` once for the spell (it said it each second: ~86k lines a day per worker); the
    mark lands once Redis takes it."""
    import os

    server = PrivateRedis(tmp_path / "redis").start()
    refusing = None
    try:
        machine = machine_factory(ONE_WORKER_ERRORED_AT_ITS_SECOND_CRASH, redis_url=server.url)
        machine.wait_ready()
        worker_id = f"test-{machine.state_dir.name}-worker-0"
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        try:
            wait_for(lambda: client.hget(f"worker:{worker_id}", "status") == "idle", timeout=20,
                     message="the worker registered as idle")
        finally:
            client.close()
        server.stop()
        refusing = _ErroringRedis(server.port, worker_id.encode())
        killed: set[int] = set()

        def errored() -> bool:  # killed until its restarts are spent (it may also give up on its own)
            row = machine.process("worker-0")
            if row is not None and row.state == "RUNNING" and row.pid not in killed:
                killed.add(row.pid)
                os.kill(row.pid, signal.SIGKILL)
            return row is not None and row.state == "ERRORED"

        wait_for(errored, timeout=30, message="worker-0 errored")
        wait_for(lambda: refusing.count >= 4, timeout=20, message="four offline marks tried (one a sweep)")
        failed = [e for e in machine.events() if e.get("message") == "worker.offline_failed"]
        assert len(failed) == 1, failed
        assert failed[0]["process_name"] == "worker-0" and "refuses every command" in failed[0]["error"]

        refusing.close()
        refusing = None
        server.start(server.port)
        machine.wait_event("worker.offline", process_name="worker-0")
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.hget(f"worker:{worker_id}", "status") == "offline"
        finally:
            client.close()
        assert len([e for e in machine.events() if e.get("message") == "worker.offline_failed"]) == 1
    finally:
        if refusing is not None:
            refusing.close()
        server.stop()

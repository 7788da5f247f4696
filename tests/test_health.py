"""The health server of a real machine over real HTTP: codes, bodies, tokens, CORS, errors, metrics, page."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emp_machine.runtime.jobs import JobStore
from harness import RunningMachine, health_base, http, http_json, machine_env, wait_for, wait_healthy, write_manifest
from status_shape import check_status_message

PY = sys.executable
TOKEN = "s3cret-token-for-tests"
ORIGIN = "https://monitor.example"
SERVICE_KEYS = {"healthy", "status", "pid", "restarts", "uptime"}


def _listener_cmd(port: int) -> str:
    return (f'{PY} -c "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);'
            f" s.bind(('127.0.0.1', {port})); s.listen(16); time.sleep(3600)\"")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, redis_server):
    """One machine for the read-only checks: a TCP-checked service and two simulation workers, a token. On a
    clean database: a simulation job another file's test left pending (a drain hands its job back) had these
    workers busy, and the idle checks failed when such a file ran before this one on the same xdist worker."""
    import redis as redis_lib

    with redis_lib.Redis.from_url(redis_server.url) as client:
        client.flushall()
    state = tmp_path_factory.mktemp("hm")
    port = _free_port()
    manifest = write_manifest(state / "manifest.yaml", f"""
health:
  port: 0
  token_env: TEST_HEALTH_TOKEN
  cors_origins: ["{ORIGIN}"]
services:
  echo:
    command: {_listener_cmd(port)}
    port: {port}
    health: {{tcp: "{{port}}", interval: 200ms, start_period: 5s}}
workers:
  sim:
    connector: simulation
    count: 2
    stop_grace: 5s
""", state, redis_server.url)
    machine = RunningMachine(manifest, state, {**machine_env(), "TEST_HEALTH_TOKEN": TOKEN})
    try:  # stopped though its set-up fails (a machine left running there outlived the test run: audit M11)
        machine.wait_ready()
        base = health_base(machine)
        wait_for(lambda: http(base + "/health")[0] == 200, 15, message="/health 200")
        yield machine, base
    finally:
        machine.close()


def test_healthy_machine_answers_200_with_every_component(healthy):
    machine, base = healthy
    status, doc = http_json(base + "/health")
    assert status == 200 and doc["healthy"] is True and doc["reasons"] == []
    assert doc["phase"] == "ready"
    assert set(doc["services"]) == {"echo-0", "worker-0", "worker-1"}
    for name, svc in doc["services"].items():
        assert SERVICE_KEYS <= set(svc), name
        assert svc["healthy"] is True and svc["status"] == "online" and svc["pid"] > 0 and svc["restarts"] == 0
        assert isinstance(svc["uptime"], int)
    assert doc["components"]["redis"] == {"healthy": True, "reason": ""}
    assert doc["components"]["supervisor"]["healthy"] is True
    assert all(w["healthy"] and w["status"] == "idle" for w in doc["workers"].values())
    assert doc["hardware"]["memory_total_bytes"] > 0
    assert doc["hardware"]["gpus"] or doc["hardware"]["gpu_note"]  # "no GPU" is a note, not an error
    assert http(base + "/ready")[0] == 200


def test_status_endpoint_serves_the_contract_document(healthy):
    machine, base = healthy
    status, doc = http_json(base + "/status")
    assert status == 200
    mid = doc["machine_id"]
    check_status_message(doc, mid, [f"{mid}-worker-0", f"{mid}-worker-1"])
    assert doc["status"]["machine"]["phase"] == "ready"
    assert doc["structure"]["capabilities"] == ["simulation"]
    assert all(s["health"] == "healthy" and s["pm2_status"] == "online" for s in doc["status"]["services"].values())


def test_metrics_parse_as_prometheus_text(healthy):
    machine, base = healthy
    status, headers, body = http(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {"workers_total", "workers_active", "machine_uptime_seconds", "machine_memory_usage_bytes"} <= set(families)
    totals = {s.labels["service"]: s.value for s in families["workers_total"].samples}
    assert totals == {"simulation": 2.0}
    assert any(name.startswith("telemetry_") for name in families)


def test_workers_active_counts_the_busy_workers(healthy, redis_server):
    # The family's presence was checked, never its value: idle workers counted as active passed (mutation
    # audit M2). 0 while idle, 1 while one job runs, 0 again after.
    import redis as redis_lib

    _, base = healthy

    def active():
        body = http(base + "/metrics")[2].decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        return {s.labels["service"]: s.value for s in families["workers_active"].samples}

    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert active() == {"simulation": 0.0}
        job_id = JobStore(client).submit("simulation", {"steps": 40, "step_ms": 100})
        wait_for(lambda: active() == {"simulation": 1.0}, 15, message="workers_active 1 while the job runs")
        wait_for(lambda: client.hget(f"job:{job_id}", "status") == "completed", 20, message="the job done")
        wait_for(lambda: active() == {"simulation": 0.0}, 15, message="workers_active 0 again")
    finally:
        client.close()


def test_cors_allows_the_monitor_origin_only(healthy):
    _, base = healthy
    _, headers, _ = http(base + "/health", headers={"Origin": ORIGIN})
    assert headers.get("Access-Control-Allow-Origin") == ORIGIN
    _, headers, _ = http(base + "/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = http(base + "/processes/echo-0/restart", "OPTIONS",
                              headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert status == 204 and "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "POST" in headers["Access-Control-Allow-Methods"] and headers["Allow"] == "OPTIONS, POST"
    status, headers, _ = http(base + "/health", "OPTIONS")
    assert status == 204 and headers["Allow"] == "GET, HEAD, OPTIONS"
    status, _, body = http(base + "/no/such/thing", "OPTIONS", headers={"Origin": ORIGIN})  # 204 for any path
    assert status == 404 and "error" in json.loads(body)


def test_malformed_requests_get_4xx_json_and_the_server_survives(healthy):
    _, base = healthy
    status, doc = http_json(base + "/no/such/thing")
    assert status == 404 and "error" in doc
    status, doc = http_json(base + "/health", "POST")
    assert status == 405 and "error" in doc
    status, doc = http_json(base + "/refresh-status", "POST", headers={"Authorization": "Bearer"})
    assert status == 401
    status, doc = http_json(base + "/processes/nope/restart", "POST", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 404 and "echo-0" in doc["processes"]
    host, port = urlsplit(base).hostname, urlsplit(base).port
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(b"\x00\xffGARBAGE / HTTP/9.9\r\n\r\n")
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0]
    assert http(base + "/health")[0] == 200


# The fixture may install chromium first (bounded at 360 s): its set-up counts toward the test's timeout, and
# a slow install must end in a skip, not in pytest-timeout's error.
@pytest.mark.timeout(480)
def test_status_page_loads_in_a_real_headless_browser(healthy, chromium, tmp_path):
    machine, base = healthy
    for attempt in range(3):
        # The page shows the verdict of the moment: on a loaded machine a late heartbeat can flip it for a
        # moment (truthfully). So the page is loaded while /health says healthy, again if it flipped meanwhile.
        wait_healthy(base, 30)
        proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run", f"--user-data-dir={tmp_path / f'profile{attempt}'}", "--dump-dom",
                               base + "/"], capture_output=True, text=True, timeout=60)
        dom = proc.stdout
        assert proc.returncode == 0 and "<h2>Processes</h2>" in dom, proc.stderr[-2000:]
        if 'id="verdict" class="healthy"' in dom:
            break
    reasons = dom[dom.find('<ul id="reasons">'):][:600]
    mid = json.loads(http(base + "/status")[2])["machine_id"]
    assert mid in dom and f"{mid}-worker-0" in dom and "echo-0" in dom
    assert 'http-equiv="refresh"' in dom and 'id="verdict" class="healthy"' in dom, reasons
    assert "<h2>GPU</h2>" in dom and "Current jobs" in dom
    assert "<script src" not in dom and "<link" not in dom  # no external assets


def test_actions_need_the_right_bearer_token(healthy):
    machine, base = healthy
    url = base + "/processes/echo-0/restart"
    assert http_json(url, "POST")[0] == 401
    assert http_json(url, "POST", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert http_json(url, "POST", headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert http_json(base + "/refresh-status", "POST", headers={"Authorization": "Bearer nope"})[0] == 401
    old = machine.process("echo-0").pid
    status, doc = http_json(url, "POST", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 202 and doc == {"restarting": "echo-0"}
    wait_for(lambda: (p := machine.process("echo-0")) and p.pid not in (0, old) and p.state == "RUNNING", 15,
             message="echo-0 restarted with a new pid")
    machine.wait_event("process.restarted", process_name="echo-0")
    assert http_json(base + "/refresh-status", "POST", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 202
    # the token is never written anywhere it could leak
    for path in (machine.log_path, *machine.state_dir.rglob("*.json"), *machine.state_dir.rglob("*.log")):
        assert TOKEN not in path.read_text(errors="replace"), path
    for endpoint in ("/health", "/status", "/", "/metrics"):
        assert TOKEN.encode() not in http(base + endpoint)[2]


# -- degraded and draining machines ---------------------------------------------------------------------

def test_degraded_service_check_then_missing_heartbeat_then_recovery(machine_factory, tmp_path, redis):
    flag = tmp_path / "healthy"
    flag.write_text("1")
    port = _free_port()
    server = tmp_path / "server.py"
    server.write_text(f"""import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if os.path.exists({str(flag)!r}) else 500); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", {port}), H).serve_forever()
""")
    machine = machine_factory(f"""
health: {{port: 0}}
services:
  api:
    command: {PY} {server}
    port: {port}
    health: {{http: "http://127.0.0.1:{{port}}/", interval: 100ms, retries: 1, start_period: 0s}}
workers:
  sim:
    connector: simulation
    service: api
    lease: 600s
    stop_grace: 5s
""")
    machine.wait_ready()
    base = health_base(machine)
    wait_for(lambda: http(base + "/health")[0] == 200, 15, message="/health 200")

    flag.unlink()  # the service starts failing its own check
    status, doc = wait_for(lambda: (r := http_json(base + "/health"))[0] == 503 and r, 5, message="/health 503")
    api = doc["services"]["api-0"]
    assert api["healthy"] is False and "HTTP 500" in api["reason"] and api["status"] == "online"
    assert any(r.startswith("api-0: HTTP 500") for r in doc["reasons"])
    assert http(base + "/ready")[0] == 200  # still booted and not draining
    machine.wait_event("service.unhealthy", process_name="api-0")
    mid = json.loads(http(base + "/status")[2])["machine_id"]
    wait_for(lambda: json.loads(http(base + "/status")[2])["status"]["services"][f"{mid}-worker-0.api"]["health"]
             == "unhealthy", 5, message="/status shows the service unhealthy")
    flag.write_text("1")
    wait_for(lambda: http(base + "/health")[0] == 200, 5, message="/health 200 after recovery")
    recovered = machine.wait_event("service.recovered", process_name="api-0")
    assert recovered["unhealthy_seconds"] > 0

    # a worker whose heartbeat key is gone (lease 600 s: the next beat is 200 s away)
    redis.delete(f"worker:{mid}-worker-0:heartbeat")
    status, doc = wait_for(lambda: (r := http_json(base + "/health"))[0] == 503 and r, 5,
                           message="/health 503 without a heartbeat")
    worker = doc["workers"][f"{mid}-worker-0"]
    assert worker["healthy"] is False and "no heartbeat" in worker["reason"]
    assert doc["services"]["worker-0"]["healthy"] is False

    # no token configured: actions are disabled, reads stay open
    status, body = http_json(base + "/refresh-status", "POST", headers={"Authorization": "Bearer anything"})
    assert status == 403 and "EMP_HEALTH_TOKEN" in body["error"]


def test_draining_machine_is_not_ready_and_not_healthy(machine_factory, redis):
    machine = machine_factory("""
health: {port: 0}
workers:
  sim:
    connector: simulation
    count: 1
    job_types: [drain-sim]  # the module's machine serves `simulation` from the same Redis
    stop_grace: 20s
""")
    machine.wait_ready()
    base = health_base(machine)
    wait_for(lambda: http(base + "/health")[0] == 200, 15, message="/health 200")
    mid = json.loads(http(base + "/status")[2])["machine_id"]
    JobStore(redis).submit("drain-sim", {"steps": 30, "step_ms": 100})  # 3 s: the drain waits for it
    wait_for(lambda: json.loads(http(base + "/status")[2])["status"]["workers"][f"{mid}-worker-0"]["status"]
             == "busy", 10, message="the worker busy")
    machine.signal(signal.SIGTERM)
    status, doc = wait_for(lambda: (r := http_json(base + "/ready"))[0] == 503 and r, 5, message="/ready 503")
    assert doc == {"ready": False, "phase": "draining"}
    status, doc = http_json(base + "/health")
    assert status == 503 and doc["phase"] == "draining" and "machine is draining" in doc["reasons"]
    assert machine.wait_exit() == 0


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium; installed with apt-get when missing and possible, else the test is skipped."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if shutil.which("apt-get") is None:
        pytest.skip("no chromium and no apt-get to install it")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    try:
        done = subprocess.run(install, capture_output=True, text=True, timeout=150)
        if done.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=60)
            done = subprocess.run(install, capture_output=True, text=True, timeout=150)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium could not be installed: {exc}")
    path = shutil.which("chromium")
    if done.returncode != 0 or path is None:
        pytest.skip(f"chromium could not be installed (apt-get exit {done.returncode}): {done.stderr[-300:]}")
    return path


def test_health_port_in_use_fails_the_boot_with_the_fix_named(machine_factory):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        machine = machine_factory(f"health: {{host: 127.0.0.1, port: {port}}}\n"
                                  "workers:\n  sim: {connector: simulation, count: 1}\n")
        assert machine.wait_exit(30) == 1
        failed = machine.event("boot.failed", step_name="health")
        assert failed and "cannot listen on 127.0.0.1" in failed["error"] and "EMP_HEALTH__PORT" in failed["error"]
        assert machine.event("boot.supervisord") is None  # nothing was started
    finally:
        holder.close()


def test_metrics_carry_the_workers_jobs_and_worker_series(machine_factory, redis_server):
    """jobs_* and worker_* are recorded in the worker processes: /metrics merges what they publish."""
    import redis as redis_lib

    machine = machine_factory("""
health: {port: 0}
workers:
  sim:
    connector: simulation
    count: 2
    job_types: [metrics-sim]  # the module's machine serves `simulation` from the same Redis
    stop_grace: 5s
""")
    machine.wait_ready()
    base = health_base(machine)
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)  # no FLUSHALL: other machines run
    try:
        store = JobStore(client)
        for _ in range(4):
            store.submit("metrics-sim", {"steps": 2, "step_ms": 5})
        store.submit("metrics-sim", {"steps": 2, "step_ms": 5, "fail_at_step": 1, "fail_retryable": False})
    finally:
        client.close()

    def scraped():
        status, _, body = http(base + "/metrics")
        assert status == 200
        return body.decode()

    def jobs(text: str, status: str) -> float:
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "jobs_processed_total" and s.labels.get("type") == "metrics-sim"
                   and s.labels.get("status") == status)
    mid = json.loads(http(base + "/status")[2])["machine_id"]
    workers = {f"{mid}-worker-0", f"{mid}-worker-1"}

    def rss_of(text: str) -> set:
        return {s.labels.get("worker_id") for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "worker_memory_usage_bytes"}
    # One worker may run all five jobs before the other's first snapshot (~1 s after its start): wait for both.
    text = wait_for(lambda: (t := scraped()) and jobs(t, "completed") == 4 and jobs(t, "failed") == 1
                    and rss_of(t) == workers and t, 20, message="/metrics to count the workers' 5 jobs")
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert {s.labels.get("worker_id") for s in samples if s.name == "jobs_processed_total"} <= workers
    assert {s.labels["worker_id"] for s in samples if s.name == "worker_memory_usage_bytes"} == workers
    assert sum(s.value for s in samples if s.name == "worker_job_duration_seconds_count") == 5
    assert {s.labels.get("worker_id") for s in samples if s.name == "telemetry_sampling_rate"} == {None, *workers}
    assert [s.labels for s in samples if s.name == "workers_total"] == [{"service": "simulation"}]
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))  # one TYPE line per family
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert len(series) == len(set(series))  # no series twice

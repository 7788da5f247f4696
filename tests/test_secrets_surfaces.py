"""Secrets that reached users' surfaces in the audit: a rest service quoting the bare token (errors, logs,
health reasons), one echoing the request headers in a successful answer (complete_job), /errors open to the
public port, and machine files readable by everyone."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import socket
import stat
import sys

import aiohttp
import pytest
from _helpers import Progress, connector_context, job
from aiohttp import web
from fakes._server import ServerThread
from harness import wait_for

from emp_machine.connectors.rest import RestConnector
from emp_machine.errors import FatalJobError, ManifestError, RetryableJobError, ServiceUnreachable
from emp_machine.runtime.health import HealthServer

TOKEN = "RestTok-a1b2c3d4e5f6g7h8"
PASSWORD = "BasicPw-9z8y7x6w5v"
PRODUCER = "Bearer ProducerBearer-6y7u8i9o0p"  # the job's own data: never the connector's to mask


def _bare_credential(header: str) -> str:
    """What a service would name: the token after the scheme; for Basic, the decoded user:password."""
    scheme, _, credential = header.partition(" ")
    if scheme.lower() == "basic":
        return base64.b64decode(credential).decode()
    return credential or header


class Service:
    """POST /run answers 401 naming the bare credential; POST /echo answers 200 quoting the request's headers
    and payload; GET /health answers 503 naming the bare token."""

    def __init__(self):
        self.thread = ServerThread(self.app).start()
        self.url = self.thread.url

    def app(self):
        app = web.Application()
        app.router.add_post("/run", self.run)
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/health", self.health)
        return app

    async def run(self, request):
        credential = _bare_credential(request.headers.get("Authorization", ""))
        return web.json_response({"detail": f"The token {credential} has expired",
                                  "password": credential.partition(":")[2]}, status=401)

    async def echo(self, request):
        headers = dict(request.headers)
        return web.json_response({"headers": headers, "payload": await request.json(),
                                  "by_token": {headers.get("Authorization", ""): "seen"}})

    async def health(self, request):
        credential = _bare_credential(request.headers.get("Authorization", ""))
        return web.json_response({"detail": f"token {credential} is not allowed here"}, status=503)


@pytest.fixture(scope="module")
def service():
    svc = Service()
    yield svc
    svc.thread.close()


@pytest.fixture
def context(tmp_path):
    return connector_context(tmp_path, "secrets")


def _connector(context, url: str, authorization: str, **settings) -> RestConnector:
    return RestConnector(RestConnector.Settings(submit_url=url, header_env={"Authorization": "AUTH"}, **settings),
                         context, env={"AUTH": authorization})


def _run(conn: RestConnector, payload):
    async def main():
        try:
            return await conn.run(job(payload, service="rest"), Progress())
        finally:
            await conn.close()
    return asyncio.run(main())


@pytest.mark.parametrize("authorization,leaks", [
    (f"Bearer {TOKEN}", [TOKEN]),
    (f"Token {TOKEN}", [TOKEN]),
    ("Basic " + base64.b64encode(f"svc-user:{PASSWORD}".encode()).decode(), [PASSWORD, f"svc-user:{PASSWORD}"]),
])
def test_a_service_error_naming_the_bare_credential_is_masked(context, service, caplog, authorization, leaks):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FatalJobError) as raised:  # becomes the job's error, timeline, jobs:failed, job_failed
        _run(_connector(context, service.url + "/run", authorization), {"x": 1})
    text = str(raised.value)
    assert "answered 401" in text and "[REDACTED]" in text
    [failed] = [r for r in caplog.records if getattr(r, "event_type", "") == "job.failed"]
    for secret in leaks:
        assert secret not in text, text
        assert secret not in failed.fields["error.message"]
        assert secret not in caplog.text  # logs, and through them telemetry and /errors


def test_a_health_check_answer_naming_the_bare_token_is_masked(context, service):
    conn = _connector(context, service.url + "/run", f"Bearer {TOKEN}", health_url=service.url + "/health")

    async def main():
        try:
            return await conn.health()
        finally:
            await conn.close()
    health = asyncio.run(main())  # its reason goes to worker:{id} connector_statuses and the logs
    assert not health.healthy and "answered 503" in health.reason
    assert TOKEN not in health.reason and "[REDACTED]" in health.reason


def test_a_password_in_a_url_is_masked_when_the_service_is_unreachable(context):
    conn = RestConnector(RestConnector.Settings(submit_url=f"http://svc:{TOKEN}@127.0.0.1:9/run"), context,
                         env={})
    with pytest.raises(RetryableJobError) as raised:
        _run(conn, {})
    assert type(raised.value) is ServiceUnreachable  # the class survives the masking
    assert TOKEN not in str(raised.value) and "[REDACTED]" in str(raised.value)


def test_a_successful_answer_echoing_the_headers_does_not_publish_the_machines_token(context, service):
    payload = {"prompt": "hi", "headers": {"Authorization": PRODUCER}}
    result = _run(_connector(context, service.url + "/echo", f"Bearer {TOKEN}"), payload)
    published = json.dumps(result.to_json())  # what complete_job / jobs:completed carry
    assert TOKEN not in published and "[REDACTED]" in published
    assert result.data["headers"]["Authorization"] == "[REDACTED]"
    assert result.data["by_token"] == {"[REDACTED]": "seen"}  # keys too
    # the producer's own data is theirs: untouched, as is everything else in the answer
    assert result.data["payload"] == payload and {k.lower(): v for k, v in result.data["headers"].items()}["x-job-id"] == "job-1"
    assert result.service_metadata == {"connector": "rest", "mode": "sync"}


# -- GET /errors ----------------------------------------------------------------------------------------

def _non_loopback_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route's source address is chosen
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


ROWS = [{"message": "POST http://svc/run answered 500: boom", "process": "worker-0"}]


def _errors_status(token: str | None, host: str, headers: dict | None = None, cors: tuple[str, ...] = (),
                   seen: dict | None = None) -> tuple[int, object]:
    server = HealthServer(None, host="0.0.0.0", port=0, token=token, token_env="EMP_HEALTH_TOKEN",
                          cors_origins=cors, process_names=set(), restart=lambda name: None, refresh=lambda: None,
                          metrics=lambda: "", errors=lambda since_s: ROWS)

    async def main():
        port = await server.start()
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://{host}:{port}/errors?since=1h", headers=headers or {}) as response:
                if seen is not None:
                    seen.update(response.headers)
                return response.status, await response.json()
        finally:
            await server.stop()
    return asyncio.run(main())


def test_errors_need_the_token_when_one_is_configured():
    assert _errors_status("health-tok-1234", "127.0.0.1")[0] == 401
    assert _errors_status("health-tok-1234", "127.0.0.1", {"Authorization": "Bearer wrong"})[0] == 401
    assert _errors_status("health-tok-1234", "127.0.0.1",
                          {"Authorization": "Bearer health-tok-1234"}) == (200, ROWS)


def test_errors_without_a_token_answer_only_loopback_clients():
    assert _errors_status(None, "127.0.0.1") == (200, ROWS)
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    status, body = _errors_status(None, address)
    assert status == 403 and "EMP_HEALTH_TOKEN" in body["error"] and body != ROWS


def test_errors_without_a_token_refuse_another_sites_page_and_a_foreign_host_name():
    # A loopback peer alone was enough: with cors_origins ['*'] any website the local user opened read the
    # error records (its Origin echoed back), and a hostile name rebound to 127.0.0.1 reached them too.
    seen: dict = {}
    status, body = _errors_status(None, "127.0.0.1", {"Origin": "http://attacker.example"}, cors=("*",), seen=seen)
    assert status == 403 and body != ROWS and "Access-Control-Allow-Origin" not in seen
    assert _errors_status(None, "127.0.0.1", {"Host": "attacker.example:9090"})[0] == 403
    # this host's own pages and tools still read them, without CORS headers (no site may read them)
    seen.clear()
    assert _errors_status(None, "127.0.0.1", {"Origin": "http://localhost:3000"}, cors=("*",), seen=seen) \
        == (200, ROWS)
    assert "Access-Control-Allow-Origin" not in seen
    assert _errors_status(None, "127.0.0.1", {"Host": "localhost:9090"}) == (200, ROWS)
    # with a token, CORS applies as configured (the token decides who reads)
    seen.clear()
    assert _errors_status("health-tok-1234", "127.0.0.1", {"Authorization": "Bearer health-tok-1234",
                                                            "Origin": "http://dash.example"},
                          cors=("http://dash.example",), seen=seen) == (200, ROWS)
    assert seen.get("Access-Control-Allow-Origin") == "http://dash.example"


# -- a service's health check URL ----------------------------------------------------------------------

def test_credentials_in_a_services_health_check_url_are_never_in_health_reasons(machine_factory, tmp_path):
    """A failing check's reason is served by /health and the status page, which need no token: the URL in it
    went whole, with its user info and a token in its query."""
    from harness import health_base, http, http_json

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    server = tmp_path / "unwell.py"
    server.write_text(f"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", {number}), H).serve_forever()
""")
    machine = machine_factory(f"""
health: {{port: 0}}
services:
  api:
    command: {sys.executable} {server}
    port: {number}
    health: {{http: "http://admin:{PASSWORD}@127.0.0.1:{{port}}/health?token={TOKEN}&view=1", interval: 100ms,
              retries: 1, start_period: 0s}}
workers:
  sim: {{connector: simulation}}
""")
    base = health_base(machine)
    # (the first failure's reason stays while the check keeps failing: refused at first, or the 503)
    status, doc = wait_for(lambda: "127.0.0.1" in (r := http_json(base + "/health"))[1].get("services", {}).get(
        "api-0", {}).get("reason", "") and r, 20, message="the check's failure on /health")
    reason = doc["services"]["api-0"]["reason"]
    assert "http://***@127.0.0.1:" in reason and "/health?token=***&view=1" in reason, reason
    page = http(base + "/")[2].decode()
    assert "http://***@127.0.0.1:" in page
    for text in (json.dumps(doc), page, http(base + "/status")[2].decode()):
        assert PASSWORD not in text and TOKEN not in text and "admin" not in text


def test_a_failing_checks_reason_hides_every_url_aiohttp_quotes():
    """aiohttp quotes our URL as yarl normalised it (%21 as !, a space as +) or a redirect's target: replacing the
    configured text alone let the token through."""
    from emp_machine.runtime.plan import Probe
    from emp_machine.runtime.probes import check_once

    async def loop(request):
        raise web.HTTPFound(f"/loop?{request.query_string}")

    async def away(request):
        raise web.HTTPFound(f"ftp://127.0.0.1/x?api_key={TOKEN}")

    def app():
        application = web.Application()
        application.router.add_get("/loop", loop)
        application.router.add_get("/away", away)
        return application

    thread = ServerThread(app).start()

    async def reasons():
        async with aiohttp.ClientSession() as session:
            return [await check_once(Probe(f"{thread.url}{path}", None, 1, 5, 0, 1), session)
                    for path in (f"/loop?token={TOKEN}%21x", f"/loop?token={TOKEN}%20x", "/away")]
    try:
        found = asyncio.run(reasons())
    finally:
        thread.close()
    assert "TooManyRedirects" in found[0] and "token=***" in found[0], found
    assert "api_key=***" in found[2], found
    for reason in found:
        assert TOKEN not in reason, reason


# -- file modes -----------------------------------------------------------------------------------------

def test_processes_under_supervisord_create_owner_only_files(machine_factory, tmp_path):
    made = tmp_path / "made-by-service.txt"
    machine = machine_factory(f"""
services:
  writer:
    command: {sys.executable} -c "import time; open('{made}', 'w').write('x'); time.sleep(600)"
workers:
  sim: {{connector: simulation, count: 1}}
""")
    machine.wait_ready()
    wait_for(lambda: made.exists(), message="the service to write its file")
    snapshots = machine.state_dir / "metrics"
    wait_for(lambda: any(snapshots.glob("*.json")), timeout=20, message="the worker's metric snapshot")
    wait_for(lambda: any((machine.state_dir / "logs").glob("worker-*.log")), message="the worker's log file")
    # and the files supervisord and the machine write themselves: logs, the machine's telemetry buffer
    files = [made, *snapshots.glob("*.json"), *(machine.state_dir / "telemetry").glob("*"),
             *(machine.state_dir / "logs").glob("*.log")]
    assert any(p.name == "supervisord.log" for p in files) and any("machine" in p.name for p in files), files
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


# -- a plugin's own secrets: plain values, no secret shape ---------------------------------------------------
PLAIN_KEY = "plainPLUGINKEY1234"  # an api_key setting: masked by value only (no `sk-`, no `key=`)
ENV_TOKEN = "tokSECRET9876xyz"  # a credential-named variable of the group's env
ECHO_PLUGIN = '''
import asyncio, logging, os
from emp_machine.connectors.base import Connector, ConnectorSettings, JobResult


class EchoSettings(ConnectorSettings):
    api_key: str = ""


class EchoConnector(Connector):
    """Says its own secrets everywhere a careless plugin would: its log, progress, the result, an error."""
    name = "echosecret"
    Settings = EchoSettings

    async def run(self, job, progress):
        key, token = self.settings.api_key, os.environ["ECHO_TOKEN"]
        self.context.logger.info("running %s with key %s token %s", job.id, key, token)
        logging.getLogger("echo.lib").warning("a library quoting %s", key)
        await progress(50, f"half way, key {key}")
        # a long message whose cut (4096 characters, with its 13-character mark) falls inside the key
        await asyncio.sleep(0.15)  # past the 100 ms throttle: written, not replaced
        await progress(75, "x" * 4080 + key)
        if job.payload.get("fail"):
            raise ValueError(f"internal boom with key {key} and token {token}")
        return JobResult(data={"echo": key, "nested": [f"t {token}"], "quoted": f'say "{key}"'},
                         service_metadata={"auth": f"used {key}"})
'''


def test_a_plugins_plain_secrets_reach_no_log_progress_result_or_error(tmp_path, monkeypatch):
    import redis as redis_lib
    from _helpers import install_plugin
    from harness import Messages, WorkerProcs

    from emp_machine.runtime.jobs import JobStore
    from emp_machine.runtime.redis_server import PrivateRedis

    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "emp_plugin_echo", ECHO_PLUGIN, {"echosecret": "EchoConnector"})
    monkeypatch.syspath_prepend(str(site))  # the manifest is validated here too, against installed connectors
    body = (f"workers:\n  echo:\n    connector: echosecret\n    job_types: [echo]\n"
            f"    settings: {{api_key: {PLAIN_KEY}}}\n    env: {{ECHO_TOKEN: {ENV_TOKEN}}}\n")
    with PrivateRedis(tmp_path / "redis") as server:
        procs = WorkerProcs(body, tmp_path / "w", server.url, machine_id="sec", environ={"PYTHONPATH": str(site)})
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        messages = None
        try:
            procs.start()
            procs.wait_up(client)
            store = JobStore(client)
            messages = Messages(client, "update_job_progress")
            ok, bad = store.submit("echo", {}), store.submit("echo", {"fail": True}, max_retries=0)
            for job_id in (ok, bad):
                wait_for(lambda job_id=job_id: client.hget(f"job:{job_id}", "status") in ("completed", "failed"),
                         15, message=f"{job_id} finished")
            assert client.hget(f"job:{ok}", "status") == "completed"
            assert client.hget(f"job:{bad}", "status") == "failed"
            # every surface: the result, the progress, the error, the worker's log lines (what it ships too)
            surfaces = {"result": client.hget("jobs:completed", ok) or "",
                        "progress": json.dumps([body for _, body in list(messages.seen)]),
                        "error": client.hget(f"job:{bad}", "error") or "",
                        "failed": client.hget("jobs:failed", bad) or ""}
            assert "[REDACTED]" in surfaces["result"] and "half way" in surfaces["progress"], surfaces
            assert "x" + PLAIN_KEY[:3] not in surfaces["progress"]  # masked before the cut, not cut through
            wait_for(lambda: "a library quoting" in procs.log(0), 5, message="the plugin's log lines")
            surfaces["log"] = procs.log(0)
            for name, text in surfaces.items():
                assert PLAIN_KEY not in text and ENV_TOKEN not in text, (name, text[-3000:])
        finally:
            if messages is not None:
                messages.close()
            procs.close()
            client.close()


# -- the machine's own secrets: its services' output, what its workers hold ---------------------------------
SVC_TOKEN = "SvcEnvVal6p0cQ"  # a credential-named env value of a service: no secret shape


def test_the_machine_masks_a_services_credential_in_the_output_it_ships_and_serves(machine_factory, tmp_path):
    """The machine tails its services' output into telemetry and /errors, and `emp-machine errors` reads their
    log files: a service printing its own API_TOKEN went out as printed (pattern redaction sees no shape in it)."""
    from harness import health_base, http_json

    script = tmp_path / "svc.py"
    script.write_text("import os, sys, time\n"
                      "print('ERROR: upstream rejected credential ' + os.environ['API_TOKEN'], flush=True)\n"
                      "time.sleep(600)\n")
    machine = machine_factory(f"""
health: {{port: 0}}
services:
  svc:
    command: {sys.executable} {script}
    env: {{API_TOKEN: {SVC_TOKEN}, PLAIN_SETTING: visible-value}}
workers:
  sim: {{connector: simulation}}
""")
    machine.wait_ready()
    base = health_base(machine)
    rows = wait_for(lambda: [r for r in http_json(f"{base}/errors?since=10m")[1] or []
                             if "upstream rejected" in r.get("message", "")], 20, message="the service's error")
    assert "credential [REDACTED]" in rows[0]["message"] and SVC_TOKEN not in json.dumps(rows), rows
    # `emp-machine errors` on this box reads the raw log files itself: the same values masked (by patterns
    # alone, the line went out as printed)
    local = machine.cli("errors", "--since", "10m", "--json")
    assert local.returncode == 0, local.stderr
    assert "upstream rejected credential [REDACTED]" in local.stdout and SVC_TOKEN not in local.stdout, local.stdout
    # stopped, the machine leaves no supervisord.conf (every process's resolved environment), and `errors`
    # still masks the token in the raw log (it reads the exact values from run/manifest.json: masked there at
    # the stop, the token showed in plain text)
    assert SVC_TOKEN in (machine.state_dir / "run" / "supervisord.conf").read_text()  # while it runs
    machine.signal(signal.SIGTERM)
    assert machine.wait_exit(40) == 0
    assert not (machine.state_dir / "run" / "supervisord.conf").exists()
    stopped = machine.cli("errors", "--since", "10m", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert "upstream rejected credential [REDACTED]" in stopped.stdout and SVC_TOKEN not in stopped.stdout


def test_machine_secrets_gather_every_credential_a_process_of_the_machine_holds(monkeypatch):
    from emp_machine.runtime.identity import machine_secrets, url_secrets
    from emp_machine.runtime.manifest import loads

    assert url_secrets("redis://user1:Pw%40rd99@h:6379/0?token=QueryTok1&db=2") == [
        "Pw%40rd99", "Pw@rd99", "QueryTok1", "QueryTok1"]  # a user beside a password is a name (`default`)
    assert url_secrets("https://TokAsUser123@h/x") == ["TokAsUser123", "TokAsUser123"]
    manifest = loads(f"""
redis: {{url: "redis://:RedisPw7q2x9@127.0.0.1:6379/0"}}
telemetry: {{otlp_endpoint: "http://127.0.0.1:4318", otlp_headers: {{x-api-key: OtlpHdr4k8m1,
  x-honeycomb-team: hcTeamKey0a1b2c3d4e5, x-honeycomb-dataset: workers}}}}
services:
  svc: {{command: run, env: {{API_TOKEN: {SVC_TOKEN}, MODE: fast}}}}
workers:
  w: {{connector: openai, settings: {{api_key_env: OPENAI_KEY}}}}
""", environ={"OPENAI_KEY": "sk-plainOpenAi1"})
    environ = {"EMP_HEALTH_TOKEN": "HealthTok3j5n", "OPENAI_KEY": "sk-plainOpenAi1",
               "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20TraceHdr9"}
    found = machine_secrets(manifest, environ)
    for value in ("RedisPw7q2x9", "OtlpHdr4k8m1", "hcTeamKey0a1b2c3d4e5", SVC_TOKEN, "sk-plainOpenAi1",
                  "HealthTok3j5n", "Bearer TraceHdr9"):
        assert value in found, (value, found)
    assert "fast" not in found and "run" not in found and "workers" not in found  # names, not credentials
    assert "sk-plainOpenAi1" not in machine_secrets(manifest, environ, groups=())  # a worker gives its own


def test_a_public_url_with_credentials_is_refused_before_it_is_published():
    from emp_machine.runtime.manifest import loads

    with pytest.raises(ManifestError) as bad:
        loads("health: {public_url: 'https://pubuser:PubPw12345@mon.example.com'}")
    assert "health.public_url" in str(bad.value) and "carries credentials" in str(bad.value)
    assert "PubPw12345" not in str(bad.value)

"""The health server's HTTP surface, in process over real loopback HTTP (the aggregate a stand-in of our own):
rules mutation audit M11 found unpinned (each could be broken with every other test passing): the token
compared whole, restart refused with no token configured, a refused restart 409 not 202, a refresh queued,
the bearer scheme in any case, CORS by exact origin with Vary and the monitor's headers, content types and
HEAD, a 405 saying what the path takes."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiohttp

from pathlib import Path

from emp_machine.runtime.health import HealthServer

TOKEN = "s3cret-token-for-tests"
ORIGIN = "https://monitor.example"


def _agg():
    return SimpleNamespace(health_body=b'{"healthy":true}', health_code=200, ready_body=b'{"ready":true}',
                           ready_code=200, status_body=b'{"machine_id":"m"}', page=lambda: b"<html></html>")


def _run(requests, token=TOKEN, cors=(ORIGIN,), restart_answer=None):
    calls = {"restart": [], "refresh": 0, "since": []}

    def restart(name):
        calls["restart"].append(name)
        return restart_answer

    def refresh():
        calls["refresh"] += 1

    def errors(since_s):
        calls["since"].append(since_s)
        return [{"message": "x"}]

    server = HealthServer(_agg(), host="127.0.0.1", port=0, token=token, token_env="EMP_HEALTH_TOKEN",
                          cors_origins=cors, process_names={"echo-0"}, restart=restart, refresh=refresh,
                          metrics=lambda: "# EOF\n", errors=errors)

    async def main():
        port = await server.start()
        out = []
        try:
            async with aiohttp.ClientSession() as session:
                for method, path, headers, data in requests:
                    async with session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers or {},
                                               data=data) as r:
                        out.append((r.status, dict(r.headers), await r.read()))
        finally:
            await server.stop()
        return out
    return asyncio.run(main()), calls


def test_a_prefix_or_extension_of_the_token_is_refused():
    bad = [TOKEN[:-1], TOKEN[:4], TOKEN + "x", TOKEN.upper()]
    results, calls = _run([("POST", "/processes/echo-0/restart", {"Authorization": f"Bearer {t}"}, None)
                           for t in bad] + [("POST", "/refresh-status", {"Authorization": f"Bearer {TOKEN[:-1]}"}, None),
                                            ("GET", "/errors", {"Authorization": f"Bearer {TOKEN[:-1]}"}, None)])
    assert [r[0] for r in results] == [401] * 6
    assert all(r[1].get("WWW-Authenticate") == "Bearer" for r in results)
    assert calls == {"restart": [], "refresh": 0, "since": []}


def test_restart_without_a_configured_token_is_refused():
    results, calls = _run([("POST", "/processes/echo-0/restart", {"Authorization": "Bearer anything"}, None),
                           ("POST", "/processes/echo-0/restart", {}, None)], token=None)
    assert [r[0] for r in results] == [403, 403] and calls["restart"] == []


def test_refresh_is_put_on_the_inbox_and_restart_reaches_the_decider():
    auth = {"Authorization": f"Bearer {TOKEN}"}
    results, calls = _run([("POST", "/refresh-status", auth, None), ("POST", "/processes/echo-0/restart", auth, None),
                           ("POST", "/processes/nope/restart", auth, None)])
    assert [r[0] for r in results] == [202, 202, 404]
    assert calls["refresh"] == 1 and calls["restart"] == ["echo-0"]


def test_a_refused_restart_is_409_not_202():
    auth = {"Authorization": f"Bearer {TOKEN}"}
    results, calls = _run([("POST", "/processes/echo-0/restart", auth, None)], restart_answer="machine draining")
    assert results[0][0] == 409 and json.loads(results[0][2]) == {"error": "machine draining"}


def test_lowercase_bearer_scheme_is_accepted():
    results, calls = _run([("POST", "/refresh-status", {"Authorization": f"bearer {TOKEN}"}, None)])
    assert results[0][0] == 202


def test_cors_exact_origin_vary_and_preflight_headers():
    results, _ = _run([("GET", "/status", {"Origin": ORIGIN}, None),
                       ("GET", "/status", {"Origin": ORIGIN + ".evil.example"}, None),
                       ("GET", "/status", {"Origin": "https://monitor.exampl"}, None),
                       ("OPTIONS", "/refresh-status", {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization,content-type"},
                        None),
                       ("GET", "/status", {}, None)])
    ok, longer, shorter, pre, none = results
    assert ok[1]["Access-Control-Allow-Origin"] == ORIGIN and ok[1]["Vary"] == "Origin"
    assert "Access-Control-Allow-Origin" not in longer[1] and "Access-Control-Allow-Origin" not in shorter[1]
    assert "Access-Control-Allow-Origin" not in none[1]
    allowed = {h.strip().lower() for h in pre[1]["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert pre[1]["Access-Control-Allow-Origin"] == ORIGIN and "POST" in pre[1]["Access-Control-Allow-Methods"]


def test_content_types_and_head():
    paths = ["/health", "/ready", "/status", "/metrics", "/"]
    results, _ = _run([("GET", p, None, None) for p in paths] + [("HEAD", p, None, None) for p in paths])
    get, head = results[:5], results[5:]
    assert [r[1]["Content-Type"] for r in get] == ["application/json"] * 3 + [
        "text/plain; version=0.0.4; charset=utf-8", "text/html; charset=utf-8"]
    assert [r[0] for r in head] == [200] * 5 and all(r[2] == b"" for r in head)
    assert [r[1]["Content-Type"] for r in head] == [r[1]["Content-Type"] for r in get]


def test_errors_pass_since_on_and_a_404_is_json():
    auth = {"Authorization": f"Bearer {TOKEN}"}
    results, calls = _run([("GET", "/errors?since=10m", auth, None), ("GET", "/errors", auth, None),
                           ("GET", "/errors?since=soon", auth, None), ("GET", "/nothing/here", None, None)])
    assert [r[0] for r in results] == [200, 200, 400, 404]
    assert calls["since"] == [600.0, 3600.0]
    assert results[3][1]["Content-Type"].startswith("application/json") and "error" in json.loads(results[3][2])


def test_405_names_what_the_path_takes():
    results, _ = _run([("POST", "/health", None, None), ("DELETE", "/status", None, None)])
    assert [r[0] for r in results] == [405, 405]
    assert results[0][1]["Allow"] == "GET,HEAD" or set(results[0][1]["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    assert results[0][1]["Content-Type"].startswith("application/json")


# -- the status page: what clients and services put in it is escaped, and it follows the state ------------

EVIL = '<script>alert("x")</script>'


def _plan(tmp_path: Path):
    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime import manifest as mf
    manifest = mf.loads(f"machine: {{type: test, id: lim, state_dir: {tmp_path / 'state'}}}\n"
                        "redis: {url: 'redis://127.0.0.1:1'}\n"
                        "workers: {sim: {connector: simulation, count: 1}}\n", environ={})
    return plan.build(manifest, hardware.probe(), resolved_manifest=tmp_path / "manifest.json", environ={})


def test_page_escapes_a_job_id_and_a_reason(tmp_path):
    from emp_machine.runtime.aggregate import Aggregator
    the_plan = _plan(tmp_path)
    agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="http://vm:9090")
    agg.set_phase("ready", True)
    wid = the_plan.workers[0].worker_id
    agg.set_worker_status(wid, "busy", EVIL, "2026-01-01T00:00:00Z")
    agg.set_supervisor_silent(EVIL)
    agg.commit()
    page = agg.page().decode()
    assert "<script>" not in page, page
    assert "&lt;script&gt;" in page


def test_page_follows_the_state_after_its_first_render(tmp_path):
    from emp_machine.runtime.aggregate import Aggregator
    the_plan = _plan(tmp_path)
    agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="http://vm:9090")
    agg.set_phase("ready", True)
    agg.commit()
    assert b"supervisord hung" not in agg.page()
    agg.set_supervisor_silent("supervisord hung")
    agg.commit()
    assert b"supervisord hung" in agg.page()

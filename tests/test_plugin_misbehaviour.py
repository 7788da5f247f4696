"""A third-party connector that misbehaves harms only its own jobs and workers: a KeyboardInterrupt out of
run() fails that job alone; health() raising any BaseException or ignoring its cancellation reads as
unhealthy; __init__ or close() failing is one clear line; a broken plugin installed beside does not stop
other workers; clashing names and malformed classes are refused at load; a plugin echoing its secret setting
does not put it in the job's error."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import redis as redis_lib
from _helpers import connector_context, install_plugin
from harness import Messages, WorkerProcs, wait_for

from emp_machine.connectors.openai import OpenAIConnector
from emp_machine.connectors.registry import GROUP, ConnectorRegistry
from emp_machine.connectors.simulation import SimulationConnector
from emp_machine.connectors.trying import try_connector
from emp_machine.errors import ConnectorLoadError
from emp_machine.runtime.jobs import JobStore

SECRET = "plainpw-Zq81xK"
LOGIN = "zz-login-Qq71"

PLUGIN = '''
import asyncio, os
from emp_machine.connectors.base import Connector, ConnectorSettings, Health, JobResult


class KbiConnector(Connector):
    name = "kbi"

    async def run(self, job, progress):
        mode = job.payload.get("mode")
        if mode == "kbi":
            raise KeyboardInterrupt()
        if mode == "genexit":
            raise GeneratorExit()
        return JobResult(data={"ok": True})


class SickSettings(ConnectorSettings):
    mode: str


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("str exploded")


class Weird(BaseException):
    pass


class SickConnector(Connector):
    name = "sick"
    Settings = SickSettings

    def health(self):  # a plain def returning the coroutine: "sync" raises before any coroutine exists
        if self.settings.mode == "sync":
            raise RuntimeError("sync health exploded")
        return self._health()

    async def _health(self):
        mode = self.settings.mode
        if mode == "sysexit":
            raise SystemExit(4)
        if mode == "kbi":
            raise KeyboardInterrupt()
        if mode == "base":
            raise Weird("weird base")
        if mode == "badstr":
            raise BadStr()
        while True:  # "hang": swallows its cancellation
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    async def run(self, job, progress):
        return JobResult()


class LeakySettings(ConnectorSettings):
    api_key: str
    login_env: str


class LeakyConnector(Connector):
    name = "leaky"
    Settings = LeakySettings

    async def run(self, job, progress):
        raise RuntimeError(f"auth failed with {self.settings.api_key} as {os.environ[self.settings.login_env]}")


class CloserConnector(Connector):
    name = "closer"

    async def run(self, job, progress):
        return JobResult()

    async def close(self):
        raise RuntimeError("close exploded")


class InitFailConnector(Connector):
    name = "initfail"

    def __init__(self, settings, context):
        raise RuntimeError("model file missing")

    async def run(self, job, progress):
        return JobResult()


class InitKbiConnector(InitFailConnector):
    def __init__(self, settings, context):
        raise KeyboardInterrupt()


class AbstractConnector(Connector):
    name = "abstract"


class DictSettingsConnector(Connector):
    name = "dictsettings"
    Settings = dict

    async def run(self, job, progress):
        return JobResult()
'''

EPS = {"kbi": "KbiConnector", "sick": "SickConnector", "leaky": "LeakyConnector", "closer": "CloserConnector",
       "initfail": "InitFailConnector", "initkbi": "InitKbiConnector", "abstract": "AbstractConnector",
       "dictsettings": "DictSettingsConnector"}
HEALTH_MODES = ("sysexit", "kbi", "base", "badstr", "hang", "sync")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("misbehave")
    module = install_plugin(site, "emp_plugin_mb", PLUGIN, EPS)
    sys.path.insert(0, str(site))  # the manifest is validated here too, against installed connectors
    yield site, module
    sys.path.remove(str(site))


@pytest.fixture(scope="module")
def client(redis_server):
    c = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture(scope="module")
def workers(client, redis_server, site, tmp_path_factory):
    """One worker per misbehaviour, started together; each test waits for its own (none waits for all)."""
    sick = "".join(f"""
      h_{mode}:
        connector: sick
        job_types: [sick-{mode}]
        settings: {{mode: {mode}}}""" for mode in HEALTH_MODES)
    body = textwrap.dedent(f"""
    workers:
      kbi:
        connector: kbi
      leaky:
        connector: leaky
        settings: {{api_key: "{SECRET}", login_env: LEAKY_LOGIN}}
        env: {{LEAKY_LOGIN: "{LOGIN}"}}
      closer:
        connector: closer
      initfail:
        connector: initfail
      initkbi:
        connector: initkbi""") + textwrap.indent(textwrap.dedent(sick), "  ") + "\n"
    procs = WorkerProcs(body, tmp_path_factory.mktemp("mbw"), redis_server.url, machine_id="mb",
                        environ={"PYTHONPATH": str(site[0])})
    procs.start()
    try:
        yield procs
    finally:
        procs.close()


def index(procs: WorkerProcs, group: str) -> int:
    return next(i for i, w in enumerate(procs.plan.workers) if w.group == group)


def statuses(client, procs, group) -> dict:
    raw = client.hget(f"worker:{procs.ids[index(procs, group)]}", "connector_statuses")
    return json.loads(raw)["sick"] if raw else {}


def finished(client, job_id, timeout=20.0) -> dict:
    return wait_for(lambda: client.hget(f"job:{job_id}", "status") in ("completed", "failed")
                    and client.hgetall(f"job:{job_id}"), timeout, message=f"job {job_id} to end")


# -- run() --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,raised", [("kbi", "KeyboardInterrupt"), ("genexit", "GeneratorExit")])
def test_a_keyboard_interrupt_out_of_run_fails_its_job_and_the_worker_goes_on(client, workers, mode, raised):
    i = index(workers, "kbi")
    workers.wait_up(client, i, timeout=40)
    pid = workers.procs[i].pid
    store = JobStore(client)
    bad = store.submit("kbi", {"mode": mode})
    job = finished(client, bad)
    assert job["status"] == "failed" and job["error"] == f"connector raised {raised}", workers.log(i)[-2000:]
    assert int(job.get("retry_count") or 0) <= 1  # failed for good, not handed back (uncounted) again and again
    ok = store.submit("kbi", {"mode": "ok"})
    assert finished(client, ok)["status"] == "completed"
    assert workers.procs[i].poll() is None and workers.procs[i].pid == pid
    assert "drain" not in workers.log(i)


# -- health() -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,reason", [
    ("sysexit", "health check failed: SystemExit: 4"),
    ("kbi", "health check failed: KeyboardInterrupt"),
    ("base", "health check failed: Weird: weird base"),
    ("badstr", "health check failed: BadStr: (its message could not be shown"),
    ("sync", "health check failed: RuntimeError: sync health exploded"),
])
def test_a_health_check_raising_anything_reads_as_unhealthy(client, workers, mode, reason):
    group = f"h_{mode}"
    i = index(workers, group)
    workers.wait_up(client, i, timeout=40)  # registered: the first check (at start) did not end the process
    entry = wait_for(lambda: statuses(client, workers, group), 10, message="connector statuses")
    assert entry["health"] == "unhealthy" and entry["reason"].startswith(reason), entry
    assert workers.procs[i].poll() is None
    assert "Traceback" not in workers.log(i)


def test_a_health_check_ignoring_its_cancellation_is_abandoned_at_the_timeout(client, workers):
    i = index(workers, "h_hang")
    workers.wait_up(client, i, timeout=40)  # HEALTH_TIMEOUT_S (5 s) after start, not never
    entry = statuses(client, workers, "h_hang")
    # registered with "health check took over 5s"; a paused worker checks again each second, and that check
    # (which may have run by now on a slow run) says "an earlier health check took over 5s and ignored ..."
    assert entry["health"] == "unhealthy" and "health check took over 5s" in entry["reason"], entry
    # the next checks do not start another one beside it (one stuck task at most), and say why
    later = wait_for(lambda: "ignored its cancellation" in statuses(client, workers, "h_hang").get("reason", "")
                     and statuses(client, workers, "h_hang"), 10, message="the abandoned check reported")
    assert later["health"] == "unhealthy" and workers.procs[i].poll() is None


# -- __init__ / close() -------------------------------------------------------------------------------------
@pytest.mark.parametrize("group,raised", [("initfail", "RuntimeError: model file missing"),
                                          ("initkbi", "KeyboardInterrupt")])
def test_a_connector_whose_init_fails_exits_with_one_clear_line(client, workers, site, group, raised):
    i = index(workers, group)
    code = workers.wait_exit(i, 40)
    log = workers.log(i)
    assert code != 0 and "Traceback" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "could not be constructed" in line]
    assert len(lines) == 1, log[-3000:]
    module = site[1]
    assert f"connector '{group}' (entry point {module}:{EPS[group]}, distribution {module})" in lines[0]
    assert raised in lines[0] and "fix the connector's __init__ or workers." + group + ".settings" in lines[0]


def test_close_raising_at_stop_is_one_line(client, workers):
    i = index(workers, "closer")
    workers.wait_up(client, i, timeout=40)
    workers.signal(i, signal.SIGTERM)
    assert workers.wait_exit(i, 20) == 0, workers.log(i)[-3000:]
    log = workers.log(i)
    assert "Traceback" not in log and "connector closer failed to close: RuntimeError: close exploded" in log


# -- secrets ------------------------------------------------------------------------------------------------
def test_a_secret_setting_echoed_by_the_plugin_is_masked_in_the_job_error_and_logs(client, workers):
    i = index(workers, "leaky")
    workers.wait_up(client, i, timeout=40)
    messages = Messages(client, "job_failed")
    try:
        job_id = JobStore(client).submit("leaky", {})
        job = finished(client, job_id)
        wait_for(lambda: messages.of("job_failed", job_id=job_id), 10, message="job_failed published")
        error = job["error"]
        assert error == "connector raised RuntimeError: auth failed with [REDACTED] as [REDACTED]", error
        for text in (json.dumps(messages.of("job_failed", job_id=job_id)), workers.log(i)):
            assert SECRET not in text and LOGIN not in text
    finally:
        messages.close()


# -- unrelated plugins --------------------------------------------------------------------------------------
def test_a_broken_plugin_installed_beside_stops_no_other_worker(client, redis_server, tmp_path):
    """One plugin exits at import, one raises an exception whose str() raises, one sleeps a minute: a worker of
    a built-in connector imports none of them (it used to import them all, and died or waited)."""
    site = tmp_path / "site"
    install_plugin(site, "emp_plugin_exit", "raise SystemExit(3)\n", {"exiter": "X"})
    install_plugin(site, "emp_plugin_badstr", textwrap.dedent('''
        class BadStr(Exception):
            def __str__(self):
                raise RuntimeError("str exploded")
        raise BadStr()
        '''), {"badstr": "X"})
    install_plugin(site, "emp_plugin_slow", "import time\ntime.sleep(60)\n", {"slow": "X"})
    procs = WorkerProcs("workers:\n  sim:\n    connector: simulation\n    job_types: [sim-beside]\n",
                        tmp_path / "w", redis_server.url, machine_id="beside", environ={"PYTHONPATH": str(site)})
    try:
        procs.start()
        procs.wait_up(client, timeout=25)
        job_id = JobStore(client).submit("sim-beside", {"steps": 1})
        assert finished(client, job_id)["status"] == "completed"
    finally:
        procs.close()


def test_discovery_survives_any_import_failure_and_names_the_distribution(tmp_path, monkeypatch):
    site = tmp_path / "site"
    exiter = install_plugin(site, "emp_plugin_exit", "raise SystemExit(3)\n", {"exiter": "X"})
    kbi = install_plugin(site, "emp_plugin_kbi", "raise KeyboardInterrupt\n", {"kbier": "X"})
    badstr = install_plugin(site, "emp_plugin_badstr", textwrap.dedent('''
        class BadStr(Exception):
            def __str__(self):
                raise RuntimeError("str exploded")
        raise BadStr()
        '''), {"badstr": "X"})
    monkeypatch.syspath_prepend(str(site))
    names = {"exiter", "kbier", "badstr"}
    registry = ConnectorRegistry.discover([ep for ep in entry_points(group=GROUP) if ep.name in names])
    failures = {f.name: f for f in registry.failures}
    assert failures["exiter"].render() == (f"connector 'exiter' ({exiter}:X, distribution {exiter}) failed to load: "
                                           f"SystemExit: 3")
    assert failures["kbier"].error == "KeyboardInterrupt" and failures["kbier"].dist == kbi
    assert failures["badstr"].error.startswith("BadStr: (its message could not be shown")
    assert failures["badstr"].dist == badstr
    # a worker's own lookup imports none of them
    assert ConnectorRegistry.for_connector("simulation").get("simulation") is SimulationConnector


# -- refused at load ----------------------------------------------------------------------------------------
def test_an_abstract_class_or_a_settings_that_is_no_model_is_refused_at_load(site):
    module = site[1]
    registry = ConnectorRegistry.for_connector("abstract")
    with pytest.raises(ConnectorLoadError) as caught:
        registry.get("abstract")
    assert str(caught.value) == (f"connector 'abstract' ({module}:AbstractConnector, distribution {module}) failed "
                                 f"to load: AbstractConnector is abstract: it does not implement run")
    registry = ConnectorRegistry.for_connector("dictsettings")
    with pytest.raises(ConnectorLoadError, match="DictSettingsConnector.Settings is <class 'dict'>, not a pydantic "
                                                 "model: subclass emp_machine.connectors.base.ConnectorSettings"):
        registry.get("dictsettings")


def test_clashing_names_are_reported_never_resolved_by_path_order(tmp_path, monkeypatch):
    source = textwrap.dedent('''
        from emp_machine.connectors.base import Connector, JobResult
        class C(Connector):
            async def run(self, job, progress):
                return JobResult()
        ''')
    site = tmp_path / "site"
    shadow = install_plugin(site, "emp_plugin_shadow", source, {"simulation": "C"})
    first = install_plugin(site, "emp_plugin_dupa", source, {"dupx": "C"})
    second = install_plugin(site, "emp_plugin_dupb", source, {"dupx": "C"})
    monkeypatch.syspath_prepend(str(site))
    # a built-in's name keeps resolving to the built-in; the plugin's entry point is reported
    registry = ConnectorRegistry.for_connector("simulation")
    assert registry.get("simulation") is SimulationConnector
    assert [f.dist for f in registry.failures] == [shadow]
    assert "clashes with the built-in connector 'simulation'" in registry.failures[0].render()
    # between two plugins, neither is used: the name fails, naming both distributions
    registry = ConnectorRegistry.for_connector("dupx")
    with pytest.raises(ConnectorLoadError) as caught:
        registry.get("dupx")
    assert first in str(caught.value) and second in str(caught.value)
    assert "2 distributions declare a connector named 'dupx'" in str(caught.value)


# -- emp-machine try, openai ----------------------------------------------------------------------------------
def test_try_reports_an_init_failure_in_one_line(site, tmp_path):
    lines: list[str] = []
    assert asyncio.run(try_connector("initfail", {}, {}, tmp_path, lines.append)) == 1
    module = site[1]
    assert lines == [f"error: connector 'initfail' (entry point {module}:InitFailConnector, distribution {module}) "
                     f"could not be constructed: RuntimeError: model file missing; fix the connector's __init__ or "
                     f"its settings"]


def test_openai_key_missing_in_a_worker_says_to_list_it_in_the_groups_env(tmp_path):
    settings = OpenAIConnector.Settings()
    in_worker = OpenAIConnector(settings, connector_context(tmp_path, "openai"), env={"WORKER_GROUP": "gen"})
    health = asyncio.run(in_worker.health())
    assert not health.healthy and health.reason == (
        "environment variable OPENAI_API_KEY is not set in this worker's environment: a worker gets only the "
        "variables listed in workers.gen.env, not the machine's; add OPENAI_API_KEY: ${OPENAI_API_KEY} there")
    alone = OpenAIConnector(settings, connector_context(tmp_path, "openai"), env={})
    assert "workers.<group>.env" in asyncio.run(alone.health()).reason

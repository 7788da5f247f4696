"""Manifests: the shipped examples validate; every bad one gets file, line, field path and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emp_machine.errors import ManifestError
from emp_machine.runtime import hardware as hw, identity, manifest as mf

MACHINES = Path(__file__).resolve().parent.parent / "machines"
ENV = {"HOME": "/home/op"}

GOOD = """
machine: {type: comfyui, id: m1}
services:
  comfyui:
    command: python main.py --port {port}
    instances: 2
    port: 8188
    health: {http: "http://127.0.0.1:{port}/system_stats", start_period: 2m}
    memory_limit: 24GiB
workers:
  comfyui:
    connector: comfyui
    service: comfyui
"""


def load(text: str, environ: dict | None = None, file: str = "m.yaml") -> mf.Manifest:
    return mf.loads(textwrap.dedent(text), file=file, environ={**ENV, **(environ or {})})


def problems(text: str, environ: dict | None = None) -> list:
    with pytest.raises(ManifestError) as info:
        load(text, environ)
    return info.value.problems


@pytest.mark.parametrize("path", sorted(MACHINES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_manifests_validate(path):
    manifest = mf.load(path, ENV)
    assert manifest.machine.id and manifest.source == str(path.resolve())


@pytest.mark.parametrize("path", [mf.BUILTIN_DEFAULT, MACHINES / "simulation.yaml"], ids=["package", "repo"])
def test_the_simulation_manifests_give_a_region_only_when_one_is_known(path):
    from emp_machine.telemetry.core import resource_attributes

    def region_of(environ):
        m = mf.load(path, {**ENV, **environ})
        attrs = resource_attributes(m.telemetry, machine_id=m.machine.id, worker_id=None, service_type="machine",
                                    region=m.machine.region or None)
        return m.machine.region, attrs.get("cloud.region")

    assert region_of({}) == ("", None)  # off Railway: no made-up cloud.region=local on every resource
    assert region_of({"RAILWAY_REPLICA_REGION": "us-west2"}) == ("us-west2", "us-west2")


def test_good_manifest_values_and_defaults():
    m = load(GOOD)
    svc = m.services["comfyui"]
    assert svc.memory_limit == 24 * 2**30
    assert svc.health.start_period == 120.0 and svc.health.retries == 3
    assert m.workers["comfyui"].count is None and m.workers["comfyui"].concurrency == 1
    assert m.status.interval == 10.0 and m.health.port == 9090
    assert m.telemetry.sampling.spans_per_second == 100 and m.telemetry.buffer.max_size == 100 * 10**6
    assert m.machine.state_dir == "/home/op/.local/state/emp-machine/m1"


def test_interpolation_defaults_required_and_escapes():
    m = load("""
    machine: {type: t, id: "${MID:-fallback}", region: "${REGION}"}
    health: {port: "${PORT:-9191}"}
    telemetry: {service_name: "cost $$5"}
    """, {"REGION": "eu-west"})
    assert (m.machine.id, m.machine.region, m.health.port) == ("fallback", "eu-west", 9191)
    assert m.telemetry.service_name == "cost $5"
    assert load('machine: {type: t, id: "${MID:-x}"}', {"MID": ""}).machine.id == "x"


def test_environment_overrides_yaml_through_pydantic_settings():
    m = load(GOOD, {"EMP_HEALTH__PORT": "9191", "EMP_SERVICES__COMFYUI__INSTANCES": "3"})
    assert m.health.port == 9191
    assert m.services["comfyui"].instances == 3
    assert m.services["comfyui"].port == 8188  # the rest of the YAML section is kept


def test_redis_url_from_environment_beats_manifest():
    assert load("redis: {url: embedded}", {"REDIS_URL": "redis://h:6379/1"}).redis.url == "redis://h:6379/1"
    assert load("redis: {url: embedded}", {"HUB_REDIS_URL": "redis://hub:6379/0"}).redis.url == "redis://hub:6379/0"


def test_machine_id_rules():
    railway = {"RAILWAY_REPLICA_ID": "4f1c2d3e-aaaa-bbbb", "RAILWAY_SERVICE_NAME": "Comfy GPU"}
    assert identity.machine_id("explicit", "comfyui", {"MACHINE_ID": "env"}, "host") == "explicit"
    assert identity.machine_id("", "comfyui", {"MACHINE_ID": "env"}, "host") == "env"
    assert identity.machine_id("", "comfyui", railway, "host") == "comfyui-comfy-gpu-4f1c2d3e"
    assert identity.machine_id("", "comfyui", {}, "Box-7.local") == "comfyui-box-7"
    # stable: the same inputs give the same id at every boot
    assert identity.machine_id("", "sim", {}, "h") == identity.machine_id("", "sim", {}, "h")
    assert identity.worker_id("m", 3) == "m-worker-3"
    assert identity.request_id().startswith("req-")


# -- bad manifests: (yaml, environment, expected path, expected line, words in message or hint) --------------
BAD = {
    "unknown top-level key": ("machien: {type: x}", {}, "machien", 1, "did you mean 'machine'"),
    "unknown nested key": ("machine:\n  typ: x", {}, "machine.typ", 2, "did you mean 'type'"),
    "misspelt service key": (GOOD.replace("instances: 2", "instanses: 2"), {}, "services.comfyui.instanses", 6,
                             "did you mean 'instances'"),
    "port not a number": ("health: {port: abc}", {}, "health.port", 1, "valid integer"),
    "port out of range": ("health: {port: 70000}", {}, "health.port", 1, "less than or equal to 65535"),
    "bad duration": ("status: {interval: soon}", {}, "status.interval", 1, "duration such as '10s'"),
    "negative duration": ("status: {interval: -5s}", {}, "status.interval", 1, "duration"),
    "bad size": (GOOD.replace("24GiB", "24 potatoes"), {}, "services.comfyui.memory_limit", 9, "size such as"),
    "instances neither int nor per_gpu": (GOOD.replace("instances: 2", "instances: lots"), {},
                                          "services.comfyui.instances", 6, "per_gpu"),
    "health with both http and tcp": (GOOD.replace('start_period: 2m', 'tcp: 1'), {}, "services.comfyui.health",
                                      8, "exactly one of 'http'"),
    "health tcp port past 65535": (GOOD.replace('http: "http://127.0.0.1:{port}/system_stats", ', 'tcp: 99999, '),
                                   {}, "services.comfyui.health.tcp", 8, "port 99999 is not a TCP port"),
    "health tcp port 0 as text": (GOOD.replace('http: "http://127.0.0.1:{port}/system_stats", ', 'tcp: "0", '),
                                  {}, "services.comfyui.health.tcp", 8, "from 1 to 65535"),
    "connector base_url not http": ("workers:\n  llm:\n    connector: openai\n    settings: {base_url: 'ftp://x y'}",
                                    {}, "workers.llm.settings.base_url", 4, "must start with http:// or https://"),
    "rest submit_url without a scheme": ("workers:\n  r:\n    connector: rest\n    settings: {submit_url: 5ms}", {},
                                         "workers.r.settings.submit_url", 4, "has no scheme"),
    "state_dir with a percent sign": ("machine: {type: t, state_dir: /tmp/st/100%}", {}, "machine.state_dir", 1,
                                      "holds '%'"),
    "unclosed variable reference": ("machine:\n  type: t\n  id: ${MACHINE_NAME\n", {}, "machine.id", 3,
                                    "is not closed by '}'"),
    "nested variable reference": ("machine:\n  type: t\n  id: ${A:-${B:-x}}\n", {}, "machine.id", 3,
                                  "plain default"),
    "a section that is not a mapping": ("redis: embedded", {}, "redis", 1,
                                        "expected a mapping (its keys indented under it), got text (valid keys: url)"),
    "memory limit of 0": ("services:\n  s: {command: x, memory_limit: 0B}", {}, "services.s.memory_limit", 2,
                          "omit memory_limit"),
    "per-type job timeout of 0": ("workers:\n  w: {connector: simulation, job_timeouts: {t: 0s}}", {},
                                  "workers.w.job_timeouts.t", 2, "greater than 0"),
    "backoff above its cap": ("workers:\n  w: {connector: simulation, restart: {backoff_initial: 1h, backoff_max: 1s}}",
                              {}, "workers.w.restart", 2, "cannot exceed the cap"),
    "connector timeout of infinity": ("workers:\n  r:\n    connector: rest\n    settings: {submit_url: 'http://h/x', "
                                      "request_timeout_s: .inf}", {}, "workers.r.settings.request_timeout_s", 4,
                                      "finite number"),
    "health with neither": (GOOD.replace('http: "http://127.0.0.1:{port}/system_stats", ', ''), {},
                            "services.comfyui.health", 8, "exactly one"),
    "worker bound to unknown service": (GOOD.replace("service: comfyui", "service: comfyiu"), {},
                                        "workers.comfyui.service", 13, "did you mean 'comfyui'"),
    "per_instance without service": ("workers:\n  w:\n    connector: simulation\n    count: per_instance", {},
                                     "workers.w.count", 4, "bound service"),
    "unknown placeholder": (GOOD.replace("--port {port}", "--port {prot}"), {}, "services.comfyui.command", 5,
                            "did you mean '{port}'"),
    "port placeholder without port": ("services:\n  s:\n    command: run --port {port}", {},
                                      "services.s.command", 3, "set a base port"),
    "gpu placeholder without per_gpu": ("services:\n  s:\n    command: run --gpu {gpu}", {},
                                        "services.s.command", 3, "per_gpu"),
    "missing command": ("services:\n  s:\n    instances: 1", {}, "services.s.command", 2, "required"),
    "connector name in capitals": ("workers:\n  w:\n    connector: WordSvc", {}, "workers.w.connector", 3,
                                   "did you mean 'wordsvc'? names are lower-case"),
    "missing connector": ("workers:\n  w:\n    count: 2", {}, "workers.w.connector", 2, "required"),
    "reserved service name": ("services:\n  redis:\n    command: x", {}, "services.redis", 2, "reserved"),
    "bad service name": ("services:\n  My Service:\n    command: x", {}, "services.My Service", 2, "lower-case"),
    "unset required variable": ("machine: {type: t, region: '${REGION}'}", {}, "machine.region", 1,
                                "REGION is not set"),
    "malformed variable": ("machine: {type: t, region: '${1BAD}'}", {}, "machine.region", 1, "malformed variable"),
    "bad redis url": ("redis: {url: 'http://x'}", {}, "redis.url", 1, "redis://"),
    "bad restart policy": ("workers:\n  w:\n    connector: s\n    restart: {policy: sometimes}", {},
                           "workers.w.restart.policy", 4, "'always'"),
    "bad stop signal": ("services:\n  s:\n    command: x\n    stop_signal: STOP", {}, "services.s.stop_signal",
                        4, "'TERM'"),
    "env value supervisord cannot carry": ("services:\n  s:\n    command: x\n    env: {A: 'it''s \"x\"'}", {},
                                           "services.s.env.A", 4, "both"),
    "bad env name": ("services:\n  s:\n    command: x\n    env: {'1A': v}", {}, "services.s.env.1A", 4,
                     "letters, digits"),
    "duplicate key": ("machine: {type: a}\nmachine: {type: b}", {}, "machine", 2, "appears twice"),
    "wrong version": ("version: 2", {}, "version", 1, "1"),
    "section not a mapping": ("services: [a, b]", {}, "services", 1,
                              "expected a mapping (its keys indented under it), got a list"),
    "override from env is bad": ("health: {port: 9090}", {"EMP_HEALTH__PORT": "nine"}, "health.port", 1,
                                 "EMP_HEALTH__PORT"),
    "telemetry budget invalid": ("telemetry: {sampling: {spans_per_second: 0}}", {},
                                 "telemetry.sampling.spans_per_second", 1, "greater than 0"),
    "lease too long": ("workers:\n  w:\n    connector: simulation\n    lease: 1h", {}, "workers.w.lease", 4,
                       "use at most 600s (10m)"),
    "no log backups": ("logs: {backups: 0}", {}, "logs.backups", 1, "use 1 or more"),
    "capability hardware not a mapping": ("workers:\n  w:\n    connector: simulation\n    capabilities: "
                                          "{hardware: 24}", {}, "workers.w.capabilities.hardware", 4,
                                          "expected a mapping, got int"),
    "capability worker_id is the worker's own": ("workers:\n  w:\n    connector: simulation\n    capabilities:\n"
                                                 "      worker_id: spoof", {}, "workers.w.capabilities.worker_id",
                                                 5, "set machine.id"),
    "capability machine_id is the worker's own": ("workers:\n  w:\n    connector: simulation\n    capabilities: "
                                                  "{machine_id: other}", {}, "workers.w.capabilities.machine_id",
                                                  4, "set machine.id"),
    "capability services come from job_types": ("workers:\n  w:\n    connector: simulation\n    job_types: [a]\n"
                                                "    capabilities: {services: [a, b]}", {},
                                                "workers.w.capabilities.services", 5, "workers.<group>.job_types"),
    "capability job map comes from job_types": ("workers:\n  w:\n    connector: simulation\n    capabilities: "
                                                "{job_service_required_map: null}", {},
                                                "workers.w.capabilities.job_service_required_map", 4,
                                                "woken for from the ones it claims"),
    "capability models not names": ("workers:\n  w:\n    connector: simulation\n    capabilities: {models: 5}", {},
                                    "workers.w.capabilities.models", 4, "expected a list of model names"),
    "capability models of a type not names": ("workers:\n  w:\n    connector: simulation\n    capabilities:\n"
                                              "      models: {simulation: {sdxl: 1}}", {},
                                              "workers.w.capabilities.models.simulation", 5, "got dict"),
    "capability model name not text": ("workers:\n  w:\n    connector: simulation\n    capabilities: "
                                       "{models: [sdxl, 1.5]}", {}, "workers.w.capabilities.models", 4,
                                       "quote the name"),
}


def test_a_lease_up_to_10m_is_fine_and_the_heartbeat_stays_within_the_contract():
    from emp_machine.runtime.worker import heartbeat_interval

    text = "workers:\n  w:\n    connector: simulation\n    lease: 10m"
    assert load(text).workers["w"].lease == 600.0
    # the contract: SETEX ... 60, renewed at least every 30 s, whatever the lease
    assert [heartbeat_interval(s) for s in (1, 3, 60, 300, 600)] == [1 / 3, 1, 20, 20, 20]


MODELS = """
workers:
  img:
    connector: simulation
    job_types: [txt2img, img2img]
    capabilities: {models: [sdxl, flux]}
  one:
    connector: simulation
    capabilities: {models: sdxl}
  mapped:
    connector: simulation
    job_types: [a, b]
    capabilities: {models: {a: [sdxl], b: flux}}
  any:
    connector: simulation
    capabilities: {models: all}
"""


def test_a_plain_models_list_means_those_models_for_each_job_type():
    workers = load(MODELS).workers
    assert workers["img"].capabilities["models"] == {"txt2img": ["sdxl", "flux"], "img2img": ["sdxl", "flux"]}
    assert workers["one"].capabilities["models"] == {"simulation": ["sdxl"]}  # the connector is the job type
    assert workers["mapped"].capabilities["models"] == {"a": ["sdxl"], "b": ["flux"]}
    assert workers["any"].capabilities["models"] == "all"
    again = mf.Manifest.model_validate_json(load(MODELS).model_dump_json())  # as a worker process reads it
    assert again.workers == load(MODELS).workers


def test_a_worker_given_a_plain_models_list_claims_jobs_needing_those_models(redis):
    from emp_machine.runtime.jobs import JobStore
    from emp_machine.runtime.worker import WorkerIdentity, capabilities

    manifest = load(MODELS)
    ident = WorkerIdentity(index=0, worker_id="m-worker-0", machine_id="m", group="img", redis_url="",
                           service_port=None)
    caps = capabilities(ident, manifest.workers["img"], {"cpu_cores": 1, "ram_gb": 1.0})
    store = JobStore(redis)
    for job_type in ("txt2img", "img2img"):
        store.submit(job_type, {}, job_id=f"needs-{job_type}", requirements={"models": ["sdxl"]})
        store.submit(job_type, {}, job_id=f"other-{job_type}", requirements={"models": ["sd3"]})
        assert store.claim(caps).id == f"needs-{job_type}"
        assert store.claim(caps) is None


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_manifest_names_path_line_and_fix(case):
    text, environ, path, line, words = BAD[case]
    found = problems(text, environ)
    match = [p for p in found if p.path == path]
    assert match, f"expected a problem at {path}, got {found}"
    problem = match[0]
    assert problem.line == line, problem
    rendered = problem.render()
    assert words in rendered, rendered
    assert rendered.startswith(f"line {line}, {path}:")


def test_yaml_syntax_error_has_a_line():
    found = problems("machine:\n  type: x\n bad: [")
    assert found[0].line is not None and "not valid YAML" in found[0].message


def test_empty_and_non_mapping_documents():
    assert "empty" in problems("")[0].message
    assert "mapping of sections" in problems("- a\n- b")[0].message


def test_all_problems_are_listed_at_once():
    found = problems("machine: {typ: x}\nhealth: {port: abc}\nstatus: {interval: soon}")
    assert {p.path for p in found} == {"machine.typ", "health.port", "status.interval"}


def test_secrets_are_not_echoed_in_errors():
    found = problems("redis: {url: 'http://user:hunter2@host'}")
    assert "hunter2" not in ManifestError("m.yaml", found).render()
    found = problems("health: {token_env: [1]}")
    assert found


@pytest.mark.parametrize("endpoint, says", [
    ("ftp://user:hunter2@collector:4318", "must start with http:// or https://, not ftp://"),
    ("collector.internal:4318", "has no scheme"),
    ("https://user:hunter2@collector:notaport", "has a port that is not a number"),
    ("http://user:hunter2@[::1", "is not a valid URL"),
    ("http:///v1", "has no host"),
])
def test_an_otlp_endpoint_that_is_not_an_http_url_is_a_manifest_problem(endpoint, says):
    (found,) = problems(f"telemetry: {{otlp_endpoint: '{endpoint}'}}")
    text = ManifestError("m.yaml", [found]).render()
    assert found.path == "telemetry.otlp_endpoint" and says in text and "hunter2" not in text


def test_a_bad_otel_endpoint_variable_is_a_manifest_problem_without_its_value():
    with pytest.raises(ManifestError) as caught:
        load("machine: {type: t, id: m1}", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318/pw=hunter2"})
    (found,) = caught.value.problems
    assert found.path == "telemetry.otlp_endpoint" and "OTEL_EXPORTER_OTLP_ENDPOINT has no scheme" in found.message
    assert "hunter2" not in caught.value.render()
    ok = load("machine: {type: t, id: m1}", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318"})
    assert ok.telemetry.otlp_endpoint == "https://collector:4318"


@pytest.mark.parametrize("variable, value, path", [
    ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20hunter2%0A", "telemetry.otlp_headers"),
    ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "hunter2", "telemetry.otlp_traces.headers"),
    ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "grpc://u:hunter2@collector:4317", "telemetry.otlp_logs.endpoint"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "telemetry.otlp_endpoint"),
    ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/json", "telemetry.otlp_metrics.endpoint"),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", "deflate", "telemetry.export.compression"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s", "telemetry.export.timeout"),
    ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "500", "telemetry.export.timeout"),
])
def test_a_bad_otel_variable_names_the_setting_it_stands_in_for(variable, value, path):
    # Every OTEL_* problem used to be filed under telemetry.otlp_endpoint, whatever the variable was.
    with pytest.raises(ManifestError) as caught:
        load("machine: {type: t, id: m1}", environ={variable: value})
    (found,) = caught.value.problems
    assert found.path == path and variable in found.message
    assert "hunter2" not in caught.value.render()


@pytest.mark.parametrize("text, path, says", [
    ("redis: {url: 'redis://:hunter2@host:notaport/0'}", "redis.url", "port that is not a number"),
    ("redis: {url: 'redis://:hunter2@host:99999/0'}", "redis.url", "port that is not a number from 0 to 65535"),
    ("health: {public_url: 'https://user:hunter2@x:bad'}", "health.public_url", "port that is not a number"),
    ("health: {public_url: 'my-machine.example'}", "health.public_url", "must start with http:// or https://"),
])
def test_urls_that_would_fail_at_boot_are_manifest_problems(text, path, says):
    # each of these booted and then died with a traceback, or could not be reached at all
    (found,) = problems(text)
    rendered = ManifestError("m.yaml", [found]).render()
    assert found.path == path and says in rendered and "hunter2" not in rendered
    (from_env,) = problems("machine: {type: t}", environ={"REDIS_URL": "redis://:hunter2@h:notaport/0"})
    assert from_env.path == "redis.url" and "hunter2" not in ManifestError("m.yaml", [from_env]).render()


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:notaport/system_stats", "the health URL has a port that is not a number"),
    ("127.0.0.1:{port}/system_stats", "the health URL has no scheme: it must start with http://"),
    ("http://:{port}/x", "the health URL has no host"),
])
def test_a_service_health_url_that_cannot_be_probed_is_a_manifest_problem(url, says):
    # it used to validate, and the machine then reported the service unhealthy forever
    (found,) = problems(GOOD.replace("http://127.0.0.1:{port}/system_stats", url))
    assert found.path == "services.comfyui.health.http" and says in found.message


def test_redact_url_hides_user_info_even_in_urls_that_do_not_parse():
    assert identity.redact_url("redis://:pw@host:6379/0") == "redis://***@host:6379/0"
    assert identity.redact_url("https://u:hunter2@h:notaport/x") == "https://***@h:notaport/x"
    assert identity.redact_url("http://u:hunter2@[::1") == "http://***@[::1"
    assert identity.redact_url("redis://:p@ss@host/1") == "redis://***@host/1"
    assert identity.redact_url("redis://host:6379") == "redis://host:6379"
    assert identity.redact_url("http://h/path@x") == "http://h/path@x"


def test_cli_validate_exit_codes_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("machine:\n  typ: x\n")
    done = subprocess.run([sys.executable, "-m", "emp_machine", "validate", str(bad)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert str(bad) in done.stderr and "line 2, machine.typ: unknown key (did you mean 'type'?)" in done.stderr
    assert "Traceback" not in done.stderr
    missing = subprocess.run([sys.executable, "-m", "emp_machine", "validate", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "file not found" in missing.stderr
    good = subprocess.run([sys.executable, "-m", "emp_machine", "validate", str(MACHINES / "comfyui.yaml")],
                          capture_output=True, text=True, timeout=30)
    assert good.returncode == 0 and "valid" in good.stdout


def test_a_manifest_that_is_not_utf8_says_where_and_how_to_save_it(tmp_path):
    # it said "cannot read the file: 'utf-8' codec can't decode byte 0xe9 in position 22: ..."
    from emp_machine.runtime.manifest import load as load_file

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("machine:\n  type: café\n".encode("latin-1"))
    with pytest.raises(ManifestError) as bad:
        load_file(latin)
    assert "line 2, (top level): the file is not UTF-8 text (byte 0xe9 is not UTF-8)" in str(bad.value)
    assert "save it as UTF-8" in str(bad.value) and "codec" not in str(bad.value)
    wide = tmp_path / "wide.yaml"
    wide.write_bytes("machine:\n  type: t\n".encode("utf-16"))
    with pytest.raises(ManifestError) as bad:
        load_file(wide)
    assert "the file is UTF-16 text, not UTF-8" in str(bad.value) and "iconv -f utf-16" in str(bad.value)


def test_a_state_dir_too_long_for_supervisords_socket_is_refused_by_validate(tmp_path):
    # `validate` said valid, then the machine refused to boot on it
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"machine: {{type: t, id: s1, state_dir: {long_dir}}}\n")
    done = subprocess.run([sys.executable, "-m", "emp_machine", "validate", str(manifest)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "machine.state_dir: the state directory is too long for supervisord's socket" in done.stderr
    assert "over the unix limit of 107" in done.stderr and "shorter directory" in done.stderr
    shorter = tmp_path / "m2.yaml"
    shorter.write_text(f"machine: {{type: t, id: s1, state_dir: {tmp_path / 'short'}}}\n")
    ok = subprocess.run([sys.executable, "-m", "emp_machine", "validate", str(shorter)], capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr


def test_backoff_max_alone_below_the_default_initial_is_no_backoff():
    # refused since the backoff-order check compared it with a default the user never wrote (review 167)
    assert load("workers:\n  w: {connector: simulation, restart: {backoff_max: 0s}}").workers["w"].restart \
        .backoff_max == 0


def test_the_embedded_redis_is_probed_fast_only_until_it_answers(tmp_path):
    # every 0.5 s for the machine's life, the probe's connect and close churned 172,800 connections a day
    # (audit BW); until the first answer run_probe checks every 0.1 s whatever the interval
    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime.cli import _resolved_data
    from emp_machine.runtime.view import View

    manifest = load(f"machine: {{type: t, id: p1, state_dir: {tmp_path}}}\nredis: {{url: embedded}}\n")
    laid = plan.build(View(_resolved_data(manifest)), hardware.probe(), environ={}, redis_port=6390,
                      resolved_manifest=tmp_path / "run" / "manifest.json")
    assert laid.redis_probe.tcp_port == 6390 and laid.redis_probe.interval >= 5.0


def test_a_tcp_probe_of_a_port_past_65535_fails_as_a_check_not_as_the_probe():
    # asyncio raised OverflowError out of check_once, ending the probe's task without a word: its service was
    # never healthy nor unhealthy, and the machine stayed `starting`
    import asyncio

    from emp_machine.runtime.plan import Probe
    from emp_machine.runtime.probes import check_once

    reason = asyncio.run(check_once(Probe(None, 99999, 1, 1, 0, 1), None))
    assert reason is not None and "tcp 127.0.0.1:99999" in reason and "OverflowError" in reason, reason


def test_cli_counts_must_be_whole_numbers_from_zero():
    for argv, says in ((["logs", "worker-0", "--lines", "-5"], "expected 0 or more, got -5"),
                       (["render", str(MACHINES / "comfyui.yaml"), "--gpus", "two"], "expected a whole number")):
        done = subprocess.run([sys.executable, "-m", "emp_machine", *argv], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


def test_run_with_a_state_dir_that_cannot_be_written_names_it_without_a_traceback(tmp_path):
    (tmp_path / "a-file").write_text("")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"machine: {{type: t, id: s1, state_dir: {tmp_path / 'a-file' / 'state'}}}\n"
                        "workers: {sim: {connector: simulation}}\n")
    done = subprocess.run([sys.executable, "-m", "emp_machine", "--manifest", str(manifest), "run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(manifest) in done.stderr and "machine.state_dir: cannot write" in done.stderr
    assert "EMP_MACHINE__STATE_DIR" in done.stderr


def test_cli_render_hides_secrets(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(textwrap.dedent(f"""
        machine: {{type: t, id: r1, state_dir: {tmp_path}}}
        redis: {{url: "redis://:s3cretpass@redis.internal:6379/0"}}
        workers:
          w:
            connector: openai
            env: {{OPENAI_API_KEY: sk-live-abcdef123456}}
    """))
    done = subprocess.run([sys.executable, "-m", "emp_machine", "render", str(manifest)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "[program:worker-0]" in done.stdout and "[unix_http_server]" in done.stdout
    assert "s3cretpass" not in done.stdout and "sk-live-abcdef123456" not in done.stdout
    assert "redis://***@redis.internal:6379/0" in done.stdout
    assert "inet_http_server" not in done.stdout  # no TCP control port, ever


def test_render_per_gpu_without_gpu_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "emp_machine", "render", str(MACHINES / "comfyui.yaml")],
                          capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin",
                                                                           "HOME": str(tmp_path)})
    if hw.read_gpus()[0]:  # on a GPU machine "auto" finds them (tests/test_gpu.py checks that layout)
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2 and "per_gpu" in done.stderr and "machine.gpus" in done.stderr
    two = subprocess.run([sys.executable, "-m", "emp_machine", "render", str(MACHINES / "comfyui.yaml"), "--gpus",
                          "2"], capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin",
                                                                                 "HOME": str(tmp_path)})
    assert two.returncode == 0, two.stderr
    assert "[program:comfyui-gpu1]" in two.stdout and 'CUDA_VISIBLE_DEVICES="1"' in two.stdout
    assert "--port 8189" in two.stdout


# -- property-based: nothing a user can write produces a traceback ------------------------------------------
# EMP_HYPOTHESIS_EXAMPLES=5000 for a longer hunt than CI's
EXAMPLES = int(os.environ.get("EMP_HYPOTHESIS_EXAMPLES", "300"))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["10s", "5m", "512MiB", "per_gpu", "per_instance",
                                                            "embedded", "{port}", "${X}", "${X:-1}", "{gpu}"]))
_keys = st.sampled_from(["machine", "redis", "services", "workers", "health", "status", "telemetry", "logs",
                         "supervisor", "type", "id", "command", "instances", "port", "connector", "service",
                         "count", "health", "http", "tcp", "env", "restart", "policy", "memory_limit", "x",
                         "version", "settings", "sampling", "buffer", "stop_signal"])
_trees = st.recursive(_scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(_keys, children, max_size=5)), max_leaves=25)


def _assert_no_crash(text: str) -> None:
    try:
        mf.loads(text, file="h.yaml", environ=ENV)
    except ManifestError as exc:
        assert exc.problems and all(p.render() for p in exc.problems)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _trees, max_size=6))
def test_random_manifests_never_raise_anything_but_manifest_error(tree):
    import yaml

    _assert_no_crash(yaml.safe_dump(tree))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_mutated_shipped_manifests_never_raise_anything_but_manifest_error(data):
    text = (MACHINES / data.draw(st.sampled_from(["comfyui.yaml", "simulation.yaml", "openai.yaml"]))).read_text()
    pos = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 8))
    insert = data.draw(st.text(alphabet=" :-{}[]$#'\"\n\tabc0123", max_size=6))
    _assert_no_crash(text[:pos] + insert + text[pos + cut:])


# -- connectors are checked when the manifest loads ----------------------------------------------------------
def test_unknown_connector_lists_installed_and_nearest():
    found = problems("workers:\n  w:\n    connector: comfy-ui")
    problem = next(p for p in found if p.path == "workers.w.connector")
    assert problem.line == 3 and "no connector named 'comfy-ui'" in problem.message
    assert "did you mean 'comfyui'?" in problem.hint and "simulation" in problem.hint


def test_bad_connector_setting_is_a_manifest_error_with_its_path():
    found = problems("workers:\n  w:\n    connector: comfyui\n    settings:\n      base_url: 5\n      timout: 3")
    paths = {p.path: p for p in found}
    assert "workers.w.settings.timout" in paths and "did you mean" in paths["workers.w.settings.timout"].hint
    assert paths["workers.w.settings.timout"].line == 6
    assert "workers.w.settings.base_url" in paths


def test_connector_settings_with_placeholders_validate():
    m = load(GOOD.replace("service: comfyui", "service: comfyui\n    settings: {base_url: 'http://127.0.0.1:{service_port}'}"))
    assert m.workers["comfyui"].settings["base_url"] == "http://127.0.0.1:{service_port}"

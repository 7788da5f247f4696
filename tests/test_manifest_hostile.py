"""Hostile and careless manifests: each gets a clear error naming the file, the field path and the fix, fast and
in bounded memory, never a traceback, never a secret repeated; and what passes survives supervisord's parser."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from supervisor.datatypes import dict_of_key_value_pairs
from supervisor.options import UnhosedConfigParser

from emp_machine.errors import ManifestError
from emp_machine.runtime import hardware, manifest as mf, plan
from emp_machine.supervisor import config as svconfig

ENV = {"HOME": "/home/op"}
SECRET = "hunter2SECRETxyz"
W = "workers:\n  sim:\n    connector: simulation\n"


def problems(text: str, environ: dict | None = None) -> list:
    with pytest.raises(ManifestError) as info:
        mf.loads(text, file="h.yaml", environ={**ENV, **(environ or {})})
    assert info.value.problems
    return info.value.problems


def one(text: str, environ: dict | None = None):
    found = problems(text, environ)
    assert len(found) == 1, found
    return found[0]


def render_conf(text: str, environ: dict | None = None, **build) -> str:
    manifest = mf.loads(text, file="h.yaml", environ={**ENV, **(environ or {})})
    the_plan = plan.build(manifest, hardware.probe(), resolved_manifest=Path("/x/manifest.json"), environ={},
                          redis_port=1, **build)
    return svconfig.render(list(the_plan.specs), the_plan.paths, parent_pid=1, machine_id=the_plan.machine_id,
                           log_max_bytes=1024, log_backups=1)


def supervisord_reads(conf: str) -> UnhosedConfigParser:
    """The config as supervisord's own parser reads it (inline ';' and '#' comments included)."""
    parser = UnhosedConfigParser()
    parser.read_string(conf)
    return parser


def cli(tmp_path: Path, text: str, *args: str, name: str = "m.yaml", timeout: float = 30) -> tuple[Path, object]:
    """The real `emp-machine` CLI in a child limited to 2 GiB of address space."""
    path = tmp_path / name
    path.write_text(text)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    done = subprocess.run([sys.executable, "-m", "emp_machine", *args, str(path)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path)})
    return path, done


def assert_clear(path: Path, done, *says: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and str(path) in done.stderr, done.stderr
    for text in says:
        assert text in done.stderr, done.stderr


# -- 1. YAML aliases: bombs, loops, depth, huge integers -----------------------------------------------------

def _bomb(depth: int) -> str:
    return (W + "    capabilities:\n      a0: &a0 [x, x, x, x, x, x, x, x, x]\n" +
            "".join(f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, depth + 1)))


def test_an_alias_bomb_is_refused_fast_in_bounded_memory(tmp_path):
    started = time.monotonic()
    path, done = cli(tmp_path, _bomb(8), "validate", timeout=60)  # 9**9 values once expanded; 600 bytes
    assert_clear(path, done, "YAML aliases repeat more than 10000 values", "workers.sim.capabilities.a")
    assert time.monotonic() - started < 30
    p = one(_bomb(4))  # in-process too, with the line of the alias that went over
    assert p.line == 9 and p.path.startswith("workers.sim.capabilities.a4") and "fewer aliases" in p.hint


def test_small_aliases_still_work():
    m = mf.loads("workers:\n  a: &w {connector: simulation, count: 2}\n  b: *w\n", file="h.yaml", environ=ENV)
    assert m.workers["b"].count == 2


def test_a_merge_key_with_an_override_is_yaml_not_a_duplicate():
    # PyYAML adds the merged keys to the mapping: a key written once beside `<<` was "this key appears twice"
    m = mf.loads("workers:\n  a: &w {connector: simulation, count: 1}\n  b:\n    <<: *w\n    count: 2\n",
                 file="h.yaml", environ=ENV)
    assert (m.workers["a"].count, m.workers["b"].count, m.workers["b"].connector) == (1, 2, "simulation")
    with pytest.raises(ManifestError) as twice:  # written twice beside it: still a duplicate
        mf.loads("workers:\n  a: &w {connector: simulation}\n  b:\n    <<: *w\n    count: 2\n    count: 3\n",
                 file="h.yaml", environ=ENV)
    assert [(p.path, p.line) for p in twice.value.problems] == [("workers.b.count", 6)]
    assert "appears twice" in twice.value.problems[0].message


@pytest.mark.parametrize("text,path,line", [
    ("workers: &a\n  sim: *a\n", "workers.sim", 2),
    ("machine:\n  region: &a [*a]\n", "machine.region[0]", 2),
])
def test_a_recursive_alias_is_a_loop_not_a_recursion_error(text, path, line):
    p = one(text)
    assert "loop" in p.message and p.path == path and p.line == line


def test_deep_nesting_and_huge_integers_are_manifest_errors():
    p = one(W + "    capabilities: {x: " + "[" * 3000 + "]" * 3000 + "}\n")
    assert "nested more than 64 levels" in p.message and p.path.startswith("workers.sim.capabilities.x[0]")
    p = one("health:\n  port: " + "1" * 5000 + "\n")  # PyYAML's int() stops at 4300 digits: a ValueError
    assert "too long" in p.message and p.line == 2


# -- 2. Infinite, NaN and huge numbers ---------------------------------------------------------------------

@pytest.mark.parametrize("text,path", [
    (W + "    memory_limit: .inf\n", "workers.sim.memory_limit"),
    (W + "    memory_limit: " + "9" * 400 + "\n", "workers.sim.memory_limit"),
    (W + "    memory_limit: '" + "9" * 400 + "GB'\n", "workers.sim.memory_limit"),
    (W + "    memory_limit: .nan\n", "workers.sim.memory_limit"),
    ("logs:\n  max_size: .inf\n" + W, "logs.max_size"),
    ("telemetry:\n  buffer:\n    max_size: .inf\n" + W, "telemetry.buffer.max_size"),
    (W + "    stop_grace: .inf\n", "workers.sim.stop_grace"),
    (W + "    stop_grace: .nan\n", "workers.sim.stop_grace"),
    (W + "    stop_grace: '" + "9" * 400 + "d'\n", "workers.sim.stop_grace"),
    ("status:\n  interval: .inf\n" + W, "status.interval"),
    ("supervisor:\n  boot_timeout: .inf\n" + W, "supervisor.boot_timeout"),
    (W + "    restart: {backoff_max: .inf}\n", "workers.sim.restart.backoff_max"),
    (W + "    job_timeout: 400d\n", "workers.sim.job_timeout"),
])
def test_non_finite_and_huge_numbers_are_refused(text, path):
    p = one(text)
    assert p.path == path and "finite" in p.message and p.line is not None
    assert len(p.render()) < 300  # a 400-digit value is not repeated whole


def test_the_largest_allowed_values_still_load():
    m = mf.loads(W + "    memory_limit: 1024TiB\n    stop_grace: 365d\n", file="h.yaml", environ=ENV)
    assert m.workers["sim"].memory_limit == 2**50 and m.workers["sim"].stop_grace == 365 * 86400


# -- 3. and 10. Commands that do not split, blank ones; job types; machine ids --------------------------------

def test_an_unbalanced_quote_is_reported_at_validation():
    p = one("services:\n  svc:\n    command: \"python 'main.py\"\n")
    assert p.path == "services.svc.command" and p.line == 3 and "unbalanced quote" in p.message


@pytest.mark.parametrize("command", ["'   '", "\"\\n\""])
def test_a_blank_command_is_refused(command):
    p = one(f"services:\n  svc:\n    command: {command}\n")
    assert p.path == "services.svc.command" and "blank" in p.message


def test_blank_job_types_are_refused():
    found = problems(W + "    job_types: [simulation, '', '  ', ' padded']\n")
    assert [p.path for p in found] == ["workers.sim.job_types[1]", "workers.sim.job_types[2]",
                                       "workers.sim.job_types[3]"]
    assert "blank" in found[0].message and "whitespace" in found[2].message


@pytest.mark.parametrize("text,environ", [
    ("machine: {id: '!!!'}\n" + W, {}),
    (W, {"MACHINE_ID": "---"}),
])
def test_a_machine_id_without_letters_or_digits_is_refused(text, environ):
    p = one(text, environ)
    assert p.path == "machine.id" and "no letters or digits" in p.message
    assert ("MACHINE_ID" in p.hint) == bool(environ)


def test_a_quote_filled_into_a_command_is_a_plan_error_not_a_traceback():
    manifest = mf.loads("machine: {id: \"o'brien\"}\nservices:\n  svc:\n    command: run {machine_id}\n",
                        file="h.yaml", environ=ENV)
    with pytest.raises(plan.PlanError, match="services.svc.command"):
        plan.build(manifest, hardware.probe(), resolved_manifest=Path("/x"), environ={}, redis_port=1)


# -- 4. and 5. What supervisord's config would cut or split ---------------------------------------------------

@pytest.mark.parametrize("text,environ,path", [
    ("services:\n  svc:\n    command: \"echo 'a #1'\"\n", {}, "services.svc.command"),
    ("services:\n  svc:\n    command: \"echo 'b ;2'\"\n", {}, "services.svc.command"),
    ("services:\n  svc:\n    command: \"echo 'a\\nb'\"\n", {}, "services.svc.command"),
    ("services:\n  svc:\n    command: sleep 1\n    cwd: '/tmp/my dir ;x'\n", {}, "services.svc.cwd"),
    ("services:\n  svc:\n    command: sleep 1\n    cwd: \"/tmp\\n[program:evil]\\ncommand=/bin/true\"\n", {},
     "services.svc.cwd"),
    ("services:\n  svc:\n    command: sleep 1\n    env: {GREETING: 'hello ;world'}\n", {},
     "services.svc.env.GREETING"),
    (W + "    env: {NOTE: 'a #b'}\n", {}, "workers.sim.env.NOTE"),
    ("machine: {id: 'my machine #1'}\n" + W, {}, "machine.id"),
    ("machine: {id: \"m1\\n[program:evil]\"}\n" + W, {}, "machine.id"),
    (W, {"MACHINE_ID": "m1 #2"}, "machine.id"),
    (W, {"MACHINE_ID": "m1\n[program:evil]"}, "machine.id"),
    ("machine: {state_dir: '/tmp/s #1'}\n" + W, {}, "machine.state_dir"),
    ("machine: {state_dir: \"/tmp/s\\nx\"}\n" + W, {}, "machine.state_dir"),
    ("machine: {id: m1}\n" + W, {"XDG_STATE_HOME": "/tmp/x ;y"}, "machine.state_dir"),
    ("services:\n  \"abc\\n\":\n    command: sleep 1\n", {}, "services.'abc\\n'"),
    ("workers:\n  \"sim\\n\":\n    connector: simulation\n", {}, "workers.'sim\\n'"),
    ("services:\n  svc:\n    command: sleep 1\n    env:\n      \"FOO\\n\": bar\n", {}, "services.svc.env.'FOO\\n'"),
])
def test_values_supervisords_config_would_cut_or_split_are_refused(text, environ, path):
    p = one(text, environ)
    assert p.path == path, p
    assert "\n" not in p.render()  # a name with a line break is shown escaped, on one line
    assert p.hint or "names" in p.message


def test_what_validation_accepts_supervisord_reads_back_whole():
    text = textwrap.dedent("""
        machine: {id: m1, state_dir: /tmp/emp-hostile-state}
        services:
          svc:
            command: "echo '#1' ';2' 'a;b' x#y 50% {port}"
            port: 8000
            cwd: /tmp/my dir
            env: {A: 'a;b', B: 'x#y', C: 'hello world'}
    """)
    conf = supervisord_reads(render_conf(text))
    program = "program:svc-0"
    assert conf.get(program, "command") == "echo '#1' ';2' 'a;b' 'x#y' 50%% 8000"
    assert conf.get(program, "directory") == "/tmp/my dir"
    env = dict_of_key_value_pairs(conf.get(program, "environment").replace("%%", "%"))
    assert (env["A"], env["B"], env["C"]) == ("a;b", "x#y", "hello world")
    assert [s for s in conf.sections() if s.startswith("program:")] == ["program:redis", program]


def test_a_newline_in_a_command_is_only_a_word_break():
    """A folded YAML block ends in a line break; shlex takes it for a space, and so does the rendered line."""
    conf = supervisord_reads(render_conf("services:\n  svc:\n    command: \"sleep 100\\n[program:evil]\"\n"))
    assert conf.get("program:svc-0", "command") == "sleep 100 '[program:evil]'"
    assert "program:evil" not in conf.sections()


def test_render_refuses_a_value_that_reaches_it_unvalidated(tmp_path):
    spec = svconfig.ProcessSpec(name="p", argv=("/bin/echo", "a #b"), kind="service")
    with pytest.raises(svconfig.SupervisorError, match="the command of p holds ';' or '#' after a space"):
        svconfig.render([spec], svconfig.Paths(tmp_path), parent_pid=1, machine_id="m", log_max_bytes=1,
                        log_backups=1)
    spec = svconfig.ProcessSpec(name="p", argv=("/bin/true",), kind="service", cwd="/tmp\n[program:evil]")
    with pytest.raises(svconfig.SupervisorError, match="the directory of p holds a control character"):
        svconfig.render([spec], svconfig.Paths(tmp_path), parent_pid=1, machine_id="m", log_max_bytes=1,
                        log_backups=1)


# -- 6. Secrets never repeated ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,environ", [
    ("health:\n  port: ${DB_PASSWORD}\n", {"DB_PASSWORD": SECRET}),
    (W + "    count: ${OPENAI_API_KEY}\n", {"OPENAI_API_KEY": "sk-" + SECRET}),
    (W + "    memory_limit: ${OPENAI_API_KEY}\n", {"OPENAI_API_KEY": "sk-" + SECRET}),
    (W + "    stop_grace: ${OPENAI_API_KEY}\n", {"OPENAI_API_KEY": "sk-" + SECRET}),
    ("workers:\n  r:\n    connector: rest\n    settings:\n      submit_url: http://h/\n"
     "      poll_interval_s: ${T}\n", {"T": SECRET}),
    ("health:\n  port: 'x-${DB_PASSWORD}'\n", {"DB_PASSWORD": SECRET}),
    ("version: 1\n", {"EMP_HEALTH__PORT": SECRET}),
    ("version: 1\n", {"EMP_TELEMETRY__OTLP_ENDPOINT": "Bearer " + SECRET}),
    ("version: 1\n", {"EMP_WORKERS": '{"sim": {"connector": "simulation", "count": "' + SECRET + '"}}'}),
    ("telemetry:\n  otlp_endpoint: 'Bearer " + SECRET + "'\n", {}),
    ("redis:\n  url: '" + SECRET + "'\n", {}),
])
def test_values_from_the_environment_or_credentials_are_never_repeated(text, environ):
    found = problems(text, environ)
    rendered = ManifestError("h.yaml", found).render()
    assert SECRET not in rendered, rendered
    assert "characters, not shown" in rendered, rendered


def test_a_plain_yaml_value_is_still_shown():
    assert "(got 'lots')" in one("health:\n  port: lots\n").render()


# -- 7. Braces in a variable's value ------------------------------------------------------------------------

def test_a_variable_holding_braces_is_text_not_placeholders():
    text = textwrap.dedent("""
        machine: {id: m1}
        services:
          svc:
            command: "run --cfg ${CFG} --port {port}"
            port: 8000
            env: {CFG: "${CFG}", MIXED: "${CFG}-{index}"}
        workers:
          sim:
            connector: simulation
            env: {X: "${CFG}"}
            settings: {unhealthy_reason: "${CFG}"}
    """)
    environ = {"CFG": '{"a": {"b": 1}}'}
    manifest = mf.loads(text, file="h.yaml", environ={**ENV, **environ})
    the_plan = plan.build(manifest, hardware.probe(), resolved_manifest=Path("/x"), environ={}, redis_port=1)
    svc, worker = the_plan.spec("svc-0"), the_plan.spec("worker-0")
    assert svc.argv == ("run", "--cfg", "{a:", "{b:", "1}}", "--port", "8000")  # split as a shell would
    assert svc.env["CFG"] == '{"a": {"b": 1}}' and svc.env["MIXED"] == '{"a": {"b": 1}}-0'
    assert worker.env["X"] == '{"a": {"b": 1}}'
    values = {"index": 0, "machine_id": "m1", "worker_id": "m1-worker-0", "name": "worker-0"}
    assert mf.expand_settings(manifest.workers["sim"].settings, values) == {"unhealthy_reason": '{"a": {"b": 1}}'}


def test_settings_placeholders_fill_known_names_and_leave_a_connectors_own_templates():
    # A rest URL with the instance's port and the connector's own {job_id} / {id} (filled per job by rest.py):
    # str.format gave up on the whole string at {job_id}, so {service_port} stayed unfilled.
    values = {"service_port": 8188, "worker_id": "m1-worker-0", "index": 0}
    settings = {"submit_url": "http://127.0.0.1:{service_port}/run/{job_id}",
                "status_url": "http://127.0.0.1:{service_port}/status/{id}?w={worker_id}",
                "body": '{"a": {"b": 1}}', "list": ["{index}", "{data.task_id}"],
                # a ${VAR} value's braces come doubled from interpolation: halved, as str.format does
                "query": "http://h:{service_port}/run/{job_id}?q={{a}}", "json": '{"a": {"b": "{worker_id}"}}'}
    assert mf.expand_settings(settings, values) == {
        "query": "http://h:8188/run/{job_id}?q={a}", "json": '{"a": {"b": "m1-worker-0"}}',
        "submit_url": "http://127.0.0.1:8188/run/{job_id}",
        "status_url": "http://127.0.0.1:8188/status/{id}?w=m1-worker-0",
        "body": '{"a": {"b": 1}}', "list": ["0", "{data.task_id}"]}


# -- 8. Ports and GPU counts -------------------------------------------------------------------------------

def test_a_port_range_past_65535_is_refused():
    p = one("services:\n  svc:\n    command: sleep {port}\n    port: 65535\n    instances: 4\n")
    assert p.path == "services.svc.port" and "65538" in p.message and p.line == 4


def test_overlapping_port_ranges_and_the_health_port_are_refused():
    found = problems(textwrap.dedent("""
        health: {port: 8001}
        services:
          a: {command: sleep 1, port: 8000, instances: 2}
          b: {command: sleep 1, port: 8001}
          c: {command: sleep 1, port: 8002, instances: 2}
    """))
    rendered = [p.render() for p in found]
    assert any("services.b.port" in r and "overlap ports 8000-8001 of services.a" in r for r in rendered), rendered
    assert any(r.startswith("line 2, health.port") and "services.a" in r for r in rendered), rendered
    assert not any("services.c" in r for r in rendered), rendered


def test_machine_gpus_is_bounded_and_render_with_a_huge_count_ends(tmp_path):
    found = problems("machine:\n  gpus: 65\n")
    assert any(p.path == "machine.gpus" and "less than or equal to 64" in p.message for p in found), found
    started = time.monotonic()
    path, done = cli(tmp_path, "machine: {id: g1}\nservices:\n  svc:\n    command: sleep 1\n    instances: per_gpu\n",
                     "render", "--gpus", "100000000", timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "per_gpu" in done.stderr and "64" in done.stderr and time.monotonic() - started < 20


def test_a_per_gpu_port_range_past_65535_is_a_plan_error():
    manifest = mf.loads("services:\n  svc:\n    command: sleep {port}\n    port: 65530\n    instances: per_gpu\n",
                        file="h.yaml", environ=ENV)
    manifest = manifest.model_copy(update={"machine": manifest.machine.model_copy(update={"gpus": 8})})
    with pytest.raises(plan.PlanError, match="past 65535"):
        plan.build(manifest, hardware.probe(), resolved_manifest=Path("/x"), environ={}, redis_port=1)


# -- 9. Bad JSON in an EMP_* variable -------------------------------------------------------------------------

@pytest.mark.parametrize("environ,variable,path", [
    ({"EMP_WORKERS": "{not json " + SECRET}, "EMP_WORKERS", "workers"),
    ({"EMP_STATUS": "ok"}, "EMP_STATUS", "status"),
    ({"EMP_TELEMETRY__OTLP_HEADERS": '{"Authorization": "Bearer ' + SECRET,
      "EMP_TELEMETRY__OTLP_ENDPOINT": "http://collector:4318"}, "EMP_TELEMETRY__OTLP_HEADERS",
     "telemetry.otlp_headers"),
])
def test_bad_json_in_an_override_names_the_variable_and_shows_valid_json(environ, variable, path):
    p = one("version: 1\n", environ)
    rendered = p.render()
    assert p.path == path and f"environment variable {variable} is not valid JSON" in rendered
    assert f"e.g. {variable}='{{" in rendered and "_MappingEnvSource" not in rendered and SECRET not in rendered


# -- fields the machine fills itself -------------------------------------------------------------------------

@pytest.mark.parametrize("text,environ,path", [
    ("source: /etc/passwd\n" + W, {}, "source"),
    ("health:\n  token: abc\n" + W, {}, "health.token"),
    (W, {"EMP_HEALTH__TOKEN": SECRET}, "health.token"),
])
def test_fields_the_machine_fills_cannot_be_set(text, environ, path):
    p = one(text, environ)
    assert p.path == path and SECRET not in p.render()


# -- the real CLI on the audit's render cases ------------------------------------------------------------------

@pytest.mark.parametrize("text,says", [
    (W + "    stop_grace: .inf\n", "workers.sim.stop_grace"),
    ("services:\n  svc:\n    command: \"python 'main.py\"\n", "services.svc.command: unbalanced quote"),
    ("machine:\n  gpus: 100000000\nservices:\n  svc:\n    command: sleep 100\n    instances: per_gpu\n",
     "machine.gpus"),
    ("services:\n  svc:\n    command: sleep 1\n    cwd: \"/tmp\\n[program:evil]\"\n", "services.svc.cwd"),
])
def test_render_cli_reports_instead_of_crashing(tmp_path, text, says):
    path, done = cli(tmp_path, text, "render", timeout=30)
    assert_clear(path, done, says)


def test_names_from_the_environment_are_not_repeated_either():
    for text in ('workers:\n  w: {connector: simulation, service: "${S}"}\n', 'workers:\n  w: {connector: "${S}"}\n'):
        p = one(text, {"S": SECRET.lower()})  # lower case: a valid connector name, only not installed
        assert SECRET.lower() not in p.render() and "environment variable gave (not shown)" in p.message

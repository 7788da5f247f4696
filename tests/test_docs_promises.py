"""What README.md and docs/operations.md promise of the CLI and the manifest, checked: `render` hides secrets
whatever their case or quoting, EMP_* overrides keep the case of free-form keys, `restart all` tries every
process, a machine with its own state_dir is found without --manifest, machine events carry `event.name`,
and `--help` lists only real commands. Real machines, real supervisord."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from emp_machine.errors import ManifestError
from emp_machine.runtime import manifest as mf
from harness import wait_for

PY = sys.executable


def _emp(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "emp_machine", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_render_hides_secrets_of_any_case_and_quoting(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""
machine: {{id: render-test, state_dir: {tmp_path / 'state'}}}
health: {{port: 0}}
services:
  svc:
    command: sleep 100
    env:
      hf_token: "${{HF_TOKEN}}"
      Api_Key: "${{K}}"
      HF_TOKEN: "${{HF_TOKEN}}"
      DB_PASSWORD: "abc'SECRETQUOTE"
      Session_Cookie: 'say "SECRETDQ" now'
      GREETING: hello
      NOTE: "uses sk-SECRETINTEXT123 here"
      UPSTREAM: "${{UPSTREAM_SECRET}}"
      MODEL_ARGS: "--listen --token SECRETFLAG1 --api-key=SECRETFLAG2"
      DB_URL: "postgres://app:SECRETPG@db/x"
  other:
    command: "serve --auth ${{UPSTREAM_SECRET}}"
""")
    env = {**os.environ, "HF_TOKEN": "hf_SECRETVALUE", "K": "sk-SECRETK", "UPSTREAM_SECRET": "EnvSECRETupstream"}
    env.pop("EMP_MANIFEST", None)
    out = _emp("render", str(manifest), env=env)
    assert out.returncode == 0, out.stderr
    assert "SECRET" not in out.stdout, [line for line in out.stdout.splitlines() if "SECRET" in line]
    for masked in ('hf_token="***"', 'Api_Key="***"', 'HF_TOKEN="***"', 'DB_PASSWORD="***"',
                   "Session_Cookie='***'"):
        assert masked in out.stdout, out.stdout
    assert 'GREETING="hello"' in out.stdout  # the rest as it is


def test_env_overrides_keep_the_case_of_free_form_keys(tmp_path):
    text = """
machine: {id: case-test}
workers:
  w:
    connector: simulation
    env: {OPENAI_API_KEY: from-yaml, hf_token: from-yaml}
    job_timeouts: {Sim: 5s}
"""
    environ = {"HOME": str(tmp_path),
               "EMP_WORKERS__W__ENV__OPENAI_API_KEY": "from-env",  # the YAML's key: replaced, not a second one
               "EMP_WORKERS__W__ENV__Extra_Var": "x",
               "EMP_WORKERS__W__CAPABILITIES__GPU_Model": "a100",
               "EMP_WORKERS__W__JOB_TIMEOUTS__Sim": "9s",
               "EMP_WORKERS__W__CONCURRENCY": "2",
               "EMP_WORKERS__NEW__CONNECTOR": "simulation"}  # a new group: names are lower-case
    loaded = mf.loads(text, environ=environ)
    assert dict(loaded.workers["w"].env) == {"OPENAI_API_KEY": "from-env", "hf_token": "from-yaml",
                                             "Extra_Var": "x"}
    assert loaded.workers["w"].capabilities["GPU_Model"] == "a100"
    assert loaded.workers["w"].job_timeouts == {"Sim": 9.0}
    assert loaded.workers["w"].concurrency == 2
    assert list(loaded.workers) == ["w", "new"]
    # A group named in another case in the variable is the manifest's group
    assert mf.loads(text, environ={"HOME": str(tmp_path), "EMP_WORKERS__W__COUNT": "3"}).workers["w"].count == 3
    # A bad value keeps naming its variable, and is not shown
    with pytest.raises(ManifestError) as err:
        mf.loads(text, environ={"HOME": str(tmp_path), "EMP_WORKERS__W__JOB_TIMEOUTS__Sim": "sekrit-value"})
    assert "EMP_WORKERS__W__JOB_TIMEOUTS__Sim" in str(err.value) and "sekrit" not in str(err.value)


def test_help_lists_only_real_commands():
    out = _emp("--help")
    assert out.returncode == 0
    assert "SUPPRESS" not in out.stdout and "machine-run" not in out.stdout, out.stdout
    assert "\n    run " in out.stdout


BROKEN = f"""
services:
  bad:
    command: /nonexistent/no-such-binary --x
    required: false
  good:
    command: {PY} -c "import time; time.sleep(600)"
workers:
  sim:
    connector: simulation
    stop_grace: 2s
"""


def test_restart_all_tries_every_process_and_reports_the_failures(machine_factory):
    machine = machine_factory(BROKEN)
    machine.wait_ready()
    wait_for(lambda: (machine.process("good-0") and machine.process("good-0").state == "RUNNING"
                      and machine.process("worker-0") and machine.process("worker-0").state == "RUNNING"),
             message="good and worker-0 running")
    before = {name: row.pid for name, row in machine.processes().items()}
    out = machine.cli("restart", "all", timeout=120)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert "could not start bad-0" in out.stderr and "1 of 3 process(es) could not restart: bad-0" in out.stderr, \
        out.stderr
    assert out.stdout.split("\n")[:2] == ["restarted good-0", "restarted worker-0"], out.stdout
    after = machine.processes()
    assert all(after[n].pid != before[n] for n in ("good-0", "worker-0")), (before, after)


def test_a_machine_with_its_own_state_dir_is_found_without_manifest(machine_factory, tmp_path):
    """The test machines set machine.state_dir (outside the per-user state root): ps, restart and logs find
    them without --manifest through the per-user registry; its entry goes when the machine exits. Its boot
    and shutdown steps carry event.name."""
    root = tmp_path / "xdg"
    machine = machine_factory(BROKEN.replace("/nonexistent/no-such-binary --x", "sleep 600"),
                              env={"XDG_STATE_HOME": str(root)})
    machine.wait_ready()
    env = {k: v for k, v in machine.env.items() if k != "EMP_MANIFEST"}
    ps = _emp("ps", "--json", env=env)
    assert ps.returncode == 0, ps.stderr
    assert f"test-{machine.state_dir.name}" in ps.stdout and '"worker-0"' in ps.stdout
    restarted = _emp("restart", "good", env=env, timeout=120)
    assert restarted.returncode == 0 and restarted.stdout.strip() == "restarted good-0", restarted.stderr
    assert list((root / "emp-machine" / ".running").glob("*.json"))

    boot = machine.event("boot.start")
    assert boot["event.name"] == "machine.boot.start" and boot["event_type"] == "machine.boot.start", boot
    machine.signal()
    assert machine.wait_exit(40) == 0
    assert machine.event("shutdown.done")["event.name"] == "machine.shutdown.done"
    assert not list((root / "emp-machine" / ".running").glob("*.json"))
    gone = _emp("ps", env=env)
    assert gone.returncode == 1 and "no machine is running" in gone.stderr, gone.stderr

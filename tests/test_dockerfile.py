"""Dockerfile.machine has what a Railway container needs (no Docker engine here: the file is parsed)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path

import pytest

from emp_machine.runtime import manifest as mf
from harness import machine_env, wait_for

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile.machine").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def test_slim_python_base_with_a_cuda_build_argument():
    assert instructions()[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert args_of("FROM") == ["${BASE_IMAGE}"]
    assert "nvidia/cuda" in (ROOT / "Dockerfile.machine").read_text()  # documented GPU build


def test_the_documented_gpu_build_gets_a_python_the_project_accepts_and_installs_into_a_venv():
    """The CUDA images carry no Python: Ubuntu 22.04's is 3.10 (pip refuses the package), Ubuntu 24.04's
    refuses a system-wide `pip install` (PEP 668). So: a 24.04 base, python3-venv, a venv, and a build that
    stops with a clear message on a Python older than pyproject's requires-python."""
    text = (ROOT / "Dockerfile.machine").read_text()
    assert "cudnn-runtime-ubuntu24.04" in text and "ubuntu22.04" not in text
    runs = " ".join(args_of("RUN"))
    assert "python3-venv" in runs and "python3-pip" not in runs
    assert "${PYTHON} -m venv /opt/venv" in runs and "/opt/venv/bin/python -m pip install" in runs
    assert "PATH=/opt/venv/bin:$PATH" in " ".join(args_of("ENV"))
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == ">=3.11" and "sys.version_info < (3, 11)" in runs


def test_tini_is_pid_1_and_runs_the_entrypoint_that_execs_emp_machine():
    assert json.loads(args_of("ENTRYPOINT")[0]) == ["/usr/bin/tini", "--", "/usr/local/bin/emp-entrypoint"]
    assert json.loads(args_of("CMD")[0]) == ["emp-machine"]
    assert any("tini" in run for run in args_of("RUN"))
    assert "docker/entrypoint.sh /usr/local/bin/emp-entrypoint" in args_of("COPY")
    assert any("chmod 755 /usr/local/bin/emp-entrypoint" in run and "command -v setpriv" in run
               for run in args_of("RUN"))


def test_package_installed_from_the_repository_with_its_manifests():
    copies = [shlex.split(c) for c in args_of("COPY")]
    assert ["emp_machine", "./emp_machine"] in copies and ["pyproject.toml", "README.md", "./"] in copies
    assert any("pip install" in run and " ." in run for run in args_of("RUN"))
    assert (ROOT / "emp_machine" / "machines" / "simulation.yaml").exists()


def test_state_on_data_without_a_volume_instruction_and_a_non_root_user_for_the_entrypoint():
    """Railway refuses to build a Dockerfile with VOLUME ("use Railway Volumes"); the volume is attached at
    /data. No USER: the entrypoint starts as root to hand the (root-owned) mounted volume to emp, then
    drops to emp."""
    assert args_of("VOLUME") == []
    assert args_of("USER") == []
    assert any("useradd --create-home --uid 1000 emp" in run and "chown emp:emp /data" in run
               for run in args_of("RUN"))
    env = " ".join(args_of("ENV"))
    assert "EMP_MANIFEST=machines/simulation.yaml" in env and "EMP_MACHINE__STATE_DIR=/data/state" in env


def test_health_port_exposed_and_healthcheck_on_health_with_a_start_period():
    assert args_of("EXPOSE") == ["9090"]
    check = args_of("HEALTHCHECK")[0]
    assert "/health" in check and "--start-period=180s" in check and "PORT" in check


def test_shipped_manifests_honour_railway_port():
    for manifest in (ROOT / "emp_machine" / "machines").glob("*.yaml"):
        assert "port: ${PORT:-9090}" in manifest.read_text(), manifest.name


def test_smoke_script_exists_and_checks_health_a_job_and_a_clean_exit():
    script = (ROOT / "docker" / "smoke.sh").read_text()
    assert "docker build -f Dockerfile.machine" in script and "/health" in script
    assert "submit" in script and "docker wait" in script


def test_rehearsal_without_docker_runs_what_the_dockerfile_runs():
    """docker/rehearse.sh mirrors the image on a host without Docker: the same files copied, the same
    environment, the same command and the same checks as docker/smoke.sh."""
    script = (ROOT / "docker" / "rehearse.sh").read_text()
    copied = [word for line in script.splitlines() if line.startswith("cp ")
              for word in shlex.split(line, comments=True)[1:-1]]
    for copy in args_of("COPY"):
        for source in shlex.split(copy)[:-1]:
            if source == "docker/entrypoint.sh":  # runs the CMD as the current user, i.e. `exec "$@"`
                continue
            assert source in copied, source
    env = dict(item.split("=", 1) for item in shlex.split(" ".join(args_of("ENV"))))
    assert f"EMP_MANIFEST={env['EMP_MANIFEST']}" in script
    assert "EMP_MACHINE__STATE_DIR=" in script and env["EMP_MACHINE__STATE_DIR"].startswith("/data/")
    assert "pip install" in script and " .)" in script
    assert json.loads(args_of("CMD")[0]) == ["emp-machine"] and '"${run_env[@]}" emp-machine >' in script
    assert "/health" in script and "submit" in script and "kill -TERM" in script


# -- Railway: railway.json --------------------------------------------------------------------------------
EMBEDDED_REDIS_STOP_S = 10.0  # plan.py: the embedded Redis's stop_grace
MACHINE_LAST_FLUSH_S = 5.0  # cli.py: the machine's last telemetry flush, tel.shutdown(timeout=5), once all stopped


def worst_case_stop_s(manifest: mf.Manifest) -> float:
    """How long a SIGTERMed machine may take: it stops its tiers one after the other (machine.py `_shutdown`):
    all workers at once, each up to its stop_grace, then all services, then the embedded Redis; then the flush."""
    workers = max((group.stop_grace for group in manifest.workers.values()), default=0.0)
    services = max((service.stop_grace for service in manifest.services.values()), default=0.0)
    redis = EMBEDDED_REDIS_STOP_S if manifest.redis.url == "embedded" else 0.0
    return workers + services + redis + MACHINE_LAST_FLUSH_S


def test_railway_builds_dockerfile_machine_and_waits_for_the_slowest_shipped_manifest_to_drain():
    """Railway builds only `Dockerfile` unless told, and SIGKILLs 3 s after SIGTERM by default
    (RAILWAY_DEPLOYMENT_DRAINING_SECONDS): a draining worker would lose its hand-back."""
    config = json.loads((ROOT / "railway.json").read_text())
    assert config["build"] == {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile.machine"}
    assert (ROOT / config["build"]["dockerfilePath"]).is_file()
    draining = config["deploy"]["drainingSeconds"]
    assert isinstance(draining, int)  # Railway's parser refuses a string ("Expected number")
    shipped = {path.stem: mf.load(path, environ={}) for path in (ROOT / "emp_machine" / "machines").glob("*.yaml")}
    assert worst_case_stop_s(shipped["comfyui"]) == 60 + 30 + MACHINE_LAST_FLUSH_S  # workers, then ComfyUI
    worst = max(worst_case_stop_s(manifest) for manifest in shipped.values())
    assert draining >= worst + 5, (draining, worst)
    assert f'"drainingSeconds": {draining}' in (ROOT / "docs" / "operations.md").read_text()


# -- docker/entrypoint.sh, run here as the image runs it (no Docker engine: the script itself) --------------
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
NOBODY = 65534
REPORT = 'echo "$$ $(id -u) $(id -g) $(id -G) $HOME"; mkdir "$EMP_MACHINE__STATE_DIR" && echo state-dir-made'
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the container starts as root; this test runs only as root")


@pytest.fixture
def open_dir():
    """A directory every user may enter (pytest's tmp_path is 0700 to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="emp-entrypoint-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_entrypoint(prefix: list[str], env: dict[str, str], script: str):
    """(process, its report line fields, stdout, stderr) of `entrypoint.sh sh -c SCRIPT`, as tini runs it."""
    proc = subprocess.Popen([*prefix, "sh", str(ENTRYPOINT), "sh", "-c", script], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    return proc, out.splitlines()[0].split() if out else [], out, err


def test_entrypoint_started_as_another_user_execs_the_command_as_it_is(open_dir):
    """`docker run --user` or Railway's RAILWAY_RUN_UID: no chown, no switch, the command in the entrypoint's
    own process (exec all the way: tini's child is the command)."""
    volume = open_dir / "data"
    volume.mkdir()
    prefix, uid = [], os.geteuid()
    if uid == 0:  # run it as nobody, on a volume nobody owns
        os.chown(volume, NOBODY, NOBODY)
        prefix, uid = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"], NOBODY
    env = {"PATH": os.environ["PATH"], "HOME": "/home/someone", "RAILWAY_VOLUME_MOUNT_PATH": str(volume),
           "EMP_MACHINE__STATE_DIR": str(volume / "state")}
    proc, (pid, got_uid, _gid, *_groups, home), out, err = run_entrypoint(prefix, env, REPORT)
    assert proc.returncode == 0 and err == "", err
    assert int(pid) == proc.pid and int(got_uid) == uid and home == "/home/someone"
    assert "state-dir-made" in out and (volume / "state").stat().st_uid == uid


@as_root
def test_entrypoint_as_root_hands_the_root_owned_volume_to_the_user_and_execs_the_command_as_it(open_dir):
    """Railway mounts the volume owned by root: the image's user could not create /data/state (exit 2 on
    every boot). The entrypoint gives the volume (and what an earlier root-run left in it) to the user, then
    execs the command as that user: its uid, gid, groups (none of root's) and home."""
    import pwd

    volume = open_dir / "data"
    (volume / "old").mkdir(parents=True)
    (volume / "old" / "machine.db").write_text("left by a root-run image")
    env = {"PATH": os.environ["PATH"], "HOME": "/root", "EMP_CONTAINER_USER": "nobody",
           "RAILWAY_VOLUME_MOUNT_PATH": str(volume), "EMP_MACHINE__STATE_DIR": str(volume / "state")}
    proc, (pid, uid, gid, *groups, home), out, err = run_entrypoint([], env, REPORT)
    assert proc.returncode == 0 and err == "", err
    assert int(pid) == proc.pid
    assert (int(uid), int(gid), home) == (NOBODY, NOBODY, pwd.getpwnam("nobody").pw_dir)
    assert "0" not in groups, groups
    assert "state-dir-made" in out
    for path in (volume, volume / "old", volume / "old" / "machine.db", volume / "state"):
        assert path.stat().st_uid == NOBODY, path


@as_root
def test_the_machine_boots_through_the_entrypoint_on_a_root_owned_volume_and_drains_on_sigterm(open_dir, redis_url):
    """The image's start as on Railway (a root-owned volume at RAILWAY_VOLUME_MOUNT_PATH, the state dir in it):
    the machine boots as the user, and SIGTERM, which tini sends to its child, reaches the machine itself."""
    import psutil

    reexec = "import os, sys; os.execv(sys.executable, [sys.executable, '-c', 'import emp_machine'])"
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                            "-c", reexec], cwd=open_dir, capture_output=True)
    if probe.returncode != 0:  # e.g. a venv whose interpreter lives under /root (0700)
        pytest.skip(f"{sys.executable} cannot be run (and re-exec'd, as the machine does) by nobody")
    volume = open_dir / "data"
    volume.mkdir()
    manifest = open_dir / "manifest.yaml"
    manifest.write_text(textwrap.dedent(f"""\
        machine: {{type: test, id: test-entrypoint}}
        redis: {{url: "{redis_url}"}}
        health: {{port: 0}}
        workers:
          sim: {{connector: simulation, count: 1, stop_grace: 5s}}
        """))
    env = {**machine_env(), "HOME": "/root", "EMP_CONTAINER_USER": "nobody",
           "RAILWAY_VOLUME_MOUNT_PATH": str(volume), "EMP_MACHINE__STATE_DIR": str(volume / "state")}
    log = open_dir / "machine.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", str(ENTRYPOINT), sys.executable, "-m", "emp_machine", "--manifest",
                                 str(manifest)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: '"machine_ready"' in log.read_text() or proc.poll() is not None, 30,
                 message="the machine ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        assert psutil.Process(proc.pid).uids().real == NOBODY
        assert psutil.Process(proc.pid).cmdline()[1:3] == ["-m", "emp_machine"]
        assert (volume / "state" / "run").stat().st_uid == NOBODY
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

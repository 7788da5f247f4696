"""Dockerfile.machine has what a Railway container needs (no Docker engine here: the file is parsed)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

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


def test_tini_is_pid_1_and_emp_machine_the_command():
    assert json.loads(args_of("ENTRYPOINT")[0]) == ["/usr/bin/tini", "--"]
    assert json.loads(args_of("CMD")[0]) == ["emp-machine"]
    assert any("tini" in run for run in args_of("RUN"))


def test_package_installed_from_the_repository_with_its_manifests():
    copies = [shlex.split(c) for c in args_of("COPY")]
    assert ["emp_machine", "./emp_machine"] in copies and ["pyproject.toml", "README.md", "./"] in copies
    assert any("pip install" in run and " ." in run for run in args_of("RUN"))
    assert (ROOT / "emp_machine" / "machines" / "simulation.yaml").exists()


def test_non_root_user_and_state_on_a_volume():
    assert args_of("USER") == ["emp"]
    assert json.loads(args_of("VOLUME")[0]) == ["/data"]
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
            assert source in copied, source
    env = dict(item.split("=", 1) for item in shlex.split(" ".join(args_of("ENV"))))
    assert f"EMP_MANIFEST={env['EMP_MANIFEST']}" in script
    assert "EMP_MACHINE__STATE_DIR=" in script and env["EMP_MACHINE__STATE_DIR"].startswith("/data/")
    assert "pip install" in script and " .)" in script
    assert json.loads(args_of("CMD")[0]) == ["emp-machine"] and '"${run_env[@]}" emp-machine >' in script
    assert "/health" in script and "submit" in script and "kill -TERM" in script

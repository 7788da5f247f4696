"""The wheel that `pip install .` in Dockerfile.machine builds carries everything the machine reads at run time.

Every other test runs from the editable install, which reads the source tree; a Lua script, a manifest or an
entry point left out of the wheel would pass them all and break only the container. The wheel is built from
exactly what the Dockerfile copies (pyproject.toml, README.md, emp_machine/), offline, with the setuptools
of the test environment.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_SUFFIXES = {".lua", ".yaml", ".html"}  # what the package reads with importlib.resources


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    context = tmp_path_factory.mktemp("docker-context")
    shutil.copy(ROOT / "pyproject.toml", context)
    shutil.copy(ROOT / "README.md", context)
    shutil.copytree(ROOT / "emp_machine", context / "emp_machine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--disable-pip-version-check", "-q", "-w", str(out), str(context)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (path,) = out.glob("emp_machine-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_every_runtime_file_of_the_source_tree_is_in_the_wheel(wheel):
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "emp_machine").rglob("*")
              if p.suffix in RUNTIME_SUFFIXES}
    assert {"emp_machine/runtime/lua/claim.lua", "emp_machine/machines/simulation.yaml"} <= wanted
    assert wanted <= set(wheel.namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "emp_machine").rglob("*.py")}
    assert modules <= set(wheel.namelist())


def test_the_wheel_declares_the_command_and_the_built_in_connectors(wheel):
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(name).decode())
    assert entry_points["console_scripts"]["emp-machine"] == "emp_machine.runtime.cli:main"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["emp_machine.connectors"]
    assert dict(entry_points["emp_machine.connectors"]) == declared
    assert set(declared) == {"simulation", "comfyui", "a1111", "openai", "rest"}

"""The suite keeps to its own Redis and identities whatever the developer's shell exports for a deployment.

With REDIS_URL exported (the shared queue), machines the tests started wrote their keys there: children
inherited it, and the manifest's REDIS_URL override beat the test Redis. conftest.py removes such variables
from os.environ for the session, and harness.machine_env() never hands them on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from emp_machine.runtime import manifest as mf
from harness import machine_env

ROOT = Path(__file__).resolve().parent.parent
EXPORTED = {"REDIS_URL": "redis://shared-queue.example:6379/0", "HUB_REDIS_URL": "redis://hub.example:6379/0",
            "MACHINE_ID": "prod-machine-1", "WORKER_ID": "prod-machine-1-worker-0", "PORT": "8080",
            "RAILWAY_PUBLIC_DOMAIN": "sim-production.up.railway.app",
            "RAILWAY_PRIVATE_DOMAIN": "sim.railway.internal", "RAILWAY_REPLICA_ID": "aaaaaaaa-1111",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example", "EMP_MANIFEST": "/nowhere/comfyui.yaml"}


def test_the_session_and_what_it_starts_see_no_deployment_variable():
    assert not set(EXPORTED) & set(os.environ), sorted(set(EXPORTED) & set(os.environ))
    assert not set(EXPORTED) & set(machine_env())
    loaded = mf.load(mf.BUILTIN_DEFAULT)  # in-process code reads os.environ
    assert loaded.redis.url == "embedded" and loaded.health.port == 9090 and loaded.health.public_url == ""
    assert loaded.machine.id != "prod-machine-1"


def test_variables_exported_in_the_developers_shell_do_not_reach_the_tests():
    env = {**os.environ, **EXPORTED, "EMP_HYPOTHESIS_EXAMPLES": "7"}
    test = f"{Path(__file__).relative_to(ROOT)}::test_the_session_and_what_it_starts_see_no_deployment_variable"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout

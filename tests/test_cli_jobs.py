"""The job commands against a running machine (real supervisord, real workers): `submit --wait` follows a
job to its end, `job <id>` prints its timeline with retries, `stuck` lists nothing while all is well."""

from __future__ import annotations

import json

import pytest

from emp_machine.runtime.jobs import JobStore
from harness import wait_for

MACHINE = """
workers:
  sim:
    connector: simulation
    count: 2
    stop_grace: 2s
"""


@pytest.fixture
def machine(machine_factory, redis):
    m = machine_factory(MACHINE)
    m.wait_ready()
    for name in ("worker-0", "worker-1"):
        wait_for(lambda: '"worker.spawned"' in m.log_of(name), timeout=20, message=f"{name} up")
    return m


def test_submit_wait_job_timeline_and_stuck(machine, redis):
    out = machine.cli("submit", "--type", "simulation", "--payload", '{"steps": 4, "step_ms": 120}', "--wait")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    job_id = lines[0].strip()
    assert lines[-1] == f"{job_id}: completed"
    assert "100.0%" in out.stdout and "[####################]" in out.stdout
    assert redis.hget(f"job:{job_id}", "status") == "completed"

    shown = machine.cli("job", job_id)
    assert shown.returncode == 0, shown.stderr
    assert f"job {job_id}  type simulation  status completed  retries 0/3" in shown.stdout
    table = shown.stdout.splitlines()
    steps = [line.split()[1] for line in table[next(i for i, l in enumerate(table) if l.startswith("AT (UTC)")) + 1:]]
    assert steps == ["submitted", "claimed", "started", "completed"], shown.stdout
    doc = json.loads(machine.cli("job", job_id, "--json").stdout)
    assert doc["status"] == "completed" and doc["total_ms"] >= 400
    assert len(doc["trace_id"]) == 32 and int(doc["trace_id"], 16)  # submit starts the job's trace
    assert [s["event"] for s in doc["steps"]] == steps
    assert doc["steps"][1]["worker_id"] == redis.hget(f"job:{job_id}", "worker_id") == doc["worker_id"]

    failing = machine.cli("submit", "--type", "simulation", "--max-retries", "2", "--wait",
                          "--payload", '{"steps": 1, "step_ms": 0, "fail_at_step": 1}')
    assert failing.returncode == 1
    bad_id = failing.stdout.splitlines()[0].strip()
    assert failing.stdout.splitlines()[-1] == f"{bad_id}: failed (simulated failure at step 1 of 1)"
    doc = json.loads(machine.cli("job", bad_id, "--json").stdout)
    assert doc["retry_count"] == 2 and doc["error"] == "simulated failure at step 1 of 1"
    evs = [(s["event"], "can_retry=True" in s["detail"]) for s in doc["steps"] if s["event"] == "failed"]
    assert evs == [("failed", True), ("failed", False)]

    stuck = machine.cli("stuck")
    assert stuck.returncode == 0 and stuck.stdout.strip() == "no stuck jobs"
    missing = machine.cli("job", "no-such-job")
    assert missing.returncode == 1 and "no job no-such-job" in missing.stderr
    assert JobStore(redis).timeline(job_id).job["status"] == "completed"

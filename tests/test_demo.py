"""The README's demo path end to end: boot with embedded Redis, demo jobs, a failed job's timeline, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from harness import wait_for


def test_demo_boots_runs_jobs_explains_a_failure_and_stops_cleanly(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    env.update(EMP_MACHINE__STATE_DIR=str(state), EMP_MACHINE__ID="demo-test", EMP_HEALTH__PORT="0",
               PYTHONUNBUFFERED="1")
    err_path, out_path = state / "demo.err", state / "demo.out"
    with open(err_path, "wb") as err, open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "emp_machine", "demo"], stdout=out, stderr=err, env=env)
        try:
            wait_for(lambda: "all demo jobs finished" in err_path.read_text() or proc.poll() is not None,
                     timeout=60, interval=0.1, message="the demo jobs to finish")
            text = err_path.read_text()
            assert proc.poll() is None, text
            lines = [line for line in text.splitlines() if line.startswith("demo |   ")]
            outcomes = [line.split()[2] for line in lines if line.split()[2] in ("completed", "failed")]
            assert sorted(outcomes) == ["completed"] * 4 + ["failed"], text
            assert "completed  retries=1  retried" in text  # the retried job went round once and succeeded
            assert "/           # the status page" in text
            failed_id = next(line.split()[4] for line in text.splitlines() if "why did it fail" in line)

            timeline = subprocess.run([sys.executable, "-m", "emp_machine", "job", failed_id, "--json"],
                                      capture_output=True, text=True, env=env, timeout=30)
            assert timeline.returncode == 0, timeline.stderr
            doc = json.loads(timeline.stdout)
            assert doc["status"] == "failed" and "simulated failure at step 2" in doc["error"]
            assert [s["event"] for s in doc["steps"]] == ["submitted", "claimed", "started", "failed"]

            ps = subprocess.run([sys.executable, "-m", "emp_machine", "ps", "--json"], capture_output=True,
                                text=True, env=env, timeout=30)
            names = {row["name"] for row in json.loads(ps.stdout)["processes"]}
            assert names == {"redis", "worker-0", "worker-1"}
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(30)
    assert code == 0
    events = [json.loads(line).get("message") for line in out_path.read_text().splitlines()
              if line.startswith("{")]
    assert "machine_ready" in events and events[-1] == "shutdown.done"

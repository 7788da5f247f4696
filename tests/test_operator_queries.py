"""`emp-machine errors` reads error records from the machine's log files; the machine's own log rotates."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

from emp_machine.runtime.logfile import RotatingTee
from emp_machine.runtime.queries import recent_errors


def _line(level, message, ts, **extra):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".000Z"
    return json.dumps({"timestamp": stamp, "level": level, "message": message, **extra}) + "\n"


def test_recent_errors_from_json_lines_tracebacks_and_error_events(tmp_path):
    now = time.time()
    (tmp_path / "worker-0.log").write_text(
        _line("info", "job.started", now - 10, job_id="j1")
        + _line("error", "job.failed", now - 5, job_id="j1", error="boom", trace_id="ab" * 16)
        + _line("error", "job.failed", now - 7200, job_id="old", error="too old")
        + _line("warning", "service.unhealthy", now - 3, reason="HTTP 500"))
    (tmp_path / "comfyui-gpu0.log").write_text(
        "loading model\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "    main()\nRuntimeError: CUDA out of memory\nnext line\n")
    (tmp_path / "quiet.log").write_text(_line("info", "all fine", now))
    rows = recent_errors(tmp_path, since_s=3600, now=now)
    messages = [r["message"] for r in rows]
    assert "boom" in messages and "HTTP 500" in messages and "RuntimeError: CUDA out of memory" in messages
    assert "too old" not in messages and "all fine" not in messages
    boom = next(r for r in rows if r["message"] == "boom")
    assert boom["job_id"] == "j1" and boom["trace_id"] == "ab" * 16 and boom["process"] == "worker-0"
    traceback = next(r for r in rows if r["event"] == "traceback")
    assert traceback["process"] == "comfyui-gpu0" and "main()" in traceback["detail"]


def test_errors_command_against_a_stopped_machines_logs(tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "worker-1.log").write_text(_line("error", "job.failed", time.time(), error="kaput"))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"machine: {{type: t, state_dir: {state}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    done = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--manifest", str(manifest), "--json"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    assert [r["message"] for r in json.loads(done.stdout)] == ["kaput"]
    bad = subprocess.run([sys.executable, "-m", "emp_machine", "errors", "--manifest", str(manifest), "--since",
                          "yesterday"], capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode == 1 and "--since" in bad.stderr


def test_machine_log_is_teed_and_rotated(tmp_path):
    primary = io.StringIO()
    tee = RotatingTee(tmp_path / "machine.log", max_bytes=100, backups=2, primary=primary)
    for i in range(12):
        tee.write(f"line {i:02d} " + "x" * 30 + "\n")
    tee.close()
    assert primary.getvalue().count("\n") == 12
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["machine.log", "machine.log.1", "machine.log.2"]
    assert "line 11" in (tmp_path / "machine.log").read_text()
    assert all(len(p.read_text()) <= 100 for p in tmp_path.iterdir())

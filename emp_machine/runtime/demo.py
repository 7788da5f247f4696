"""The demo: once the simulation machine is up, submit a handful of jobs and say where to look.

Runs in a thread beside the machine (`emp-machine demo`), talking to it only the way an operator would:
the machine's pointer file, supervisord's socket and Redis.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

DEMO_JOBS = [
    ("ok: 5 steps", {"steps": 5, "step_ms": 200}),
    ("ok: with an output file", {"steps": 3, "step_ms": 300, "output_bytes": 65536}),
    ("ok: high priority", {"steps": 2, "step_ms": 100}),
    ("retried: fails once, then succeeds", {"steps": 3, "step_ms": 100, "fail_attempts": 1}),
    ("failed: permanent error at step 2", {"steps": 4, "step_ms": 100, "fail_at_step": 2, "fail_retryable": False}),
]


def wait_until_up(state_dir: Path, stop: threading.Event, timeout_s: float = 60.0) -> dict | None:
    """The machine's pointer document once every process it started is RUNNING, else None."""
    from emp_machine.errors import SupervisorError
    from emp_machine.supervisor.control import Supervisor

    pointer = state_dir / "run" / "machine.json"
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            doc = json.loads(pointer.read_text(encoding="utf-8"))
            rows = Supervisor(doc["socket"]).processes()
            if rows and all(r.state == "RUNNING" for r in rows):
                return doc
        except (OSError, ValueError, KeyError, SupervisorError):
            pass
        stop.wait(0.1)
    return None


def run(state_dir: Path, say: Callable[[str], None], stop: threading.Event) -> None:
    import redis

    from emp_machine.runtime.jobs import JobStore

    doc = wait_until_up(state_dir, stop)
    if doc is None:
        return
    client = redis.Redis.from_url(doc["redis_url"], decode_responses=True)
    store = JobStore(client)
    ids = []
    for i, (label, payload) in enumerate(DEMO_JOBS):
        priority = 90 if "high priority" in label else 50
        ids.append((label, store.submit("simulation", payload, priority=priority, max_retries=3)))
    say(f"submitted {len(ids)} demo jobs; while they run, try in another terminal:")
    say("  .venv/bin/emp-machine ps                 # processes, like pm2 list")
    say(f"  .venv/bin/emp-machine job {ids[-1][1]}   # why did it fail?")
    say("  .venv/bin/emp-machine logs worker-0 -f   # a worker's log")
    if doc.get("health_port"):
        say(f"  http://localhost:{doc['health_port']}/           # the status page (/health, /status, /metrics)")
    say("  .venv/bin/emp-machine submit --type simulation --payload '{\"steps\": 10}' --wait")
    deadline = time.monotonic() + 60
    pending = dict((job_id, label) for label, job_id in ids)
    while pending and not stop.is_set() and time.monotonic() < deadline:
        for job_id in list(pending):
            job = client.hgetall(f"job:{job_id}")
            if job.get("status") in ("completed", "failed"):
                label = pending.pop(job_id)
                detail = f" ({job.get('error')})" if job.get("status") == "failed" else ""
                say(f"  {job.get('status'):>9}  retries={job.get('retry_count', 0)}  {label}{detail}")
        stop.wait(0.2)
    if not pending:
        say("all demo jobs finished; the machine keeps running (Ctrl-C to stop it)")
    client.close()

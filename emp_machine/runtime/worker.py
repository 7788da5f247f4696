"""One worker process, as supervisord starts it.

Placeholder until the jobs issue: it loads the resolved manifest, announces itself, stays alive with a
heartbeat log line, and exits 0 on SIGTERM. It processes no jobs, and says so in its log.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from emp_machine.runtime.manifest import Manifest

HEARTBEAT_S = 30.0


def _line(event: str, **fields) -> None:
    record = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": "info",
              "event_type": event, "message": event, **fields}
    print(json.dumps(record), flush=True)


def run(manifest_path: Path, index: int) -> int:
    manifest = Manifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    worker_id = os.environ.get("WORKER_ID", f"{manifest.machine.id}-worker-{index}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _line("worker.spawned", machine_id=manifest.machine.id, worker_id=worker_id, pid=os.getpid(),
          connector=os.environ.get("CONNECTOR", ""), note="placeholder worker: takes no jobs yet")
    while not stop.wait(HEARTBEAT_S):
        _line("worker.heartbeat", worker_id=worker_id)
    _line("worker.stopped", worker_id=worker_id, reason="signal")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), int(sys.argv[2])))

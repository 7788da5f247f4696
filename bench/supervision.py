"""Supervision benchmark: restart latency after SIGKILL, machine + supervisord memory, boot time.

    ./dev bench supervision            (or: .venv/bin/python bench/supervision.py [--kills 20] [--boots 3])

Boots real machines from a simulation manifest with 8 (placeholder) workers and the embedded Redis, on
loopback, in a temporary state directory. Bounded: about 30 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from emp_machine.errors import SupervisorError
from emp_machine.supervisor.control import Supervisor

MANIFEST = """
machine: {{type: bench, id: bench-{n}, state_dir: {state}}}
redis: {{url: embedded}}
workers:
  sim:
    connector: simulation
    count: 8
    stop_grace: 5s
    restart: {{reset_after: 500ms}}
"""


class Machine:
    def __init__(self, root: Path, n: int):
        state = root / f"s{n}"
        state.mkdir()
        manifest = state / "m.yaml"
        manifest.write_text(MANIFEST.format(n=n, state=state))
        self.log = state / "machine.out"
        self.started = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "emp_machine", "--manifest", str(manifest)],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env)
        self.control = Supervisor(state / "run" / "supervisor.sock")

    def wait_all_running(self, count: int, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rows = [r for r in self.control.processes() if r.name.startswith("worker-")]
                if len(rows) == count and all(r.state == "RUNNING" for r in rows):
                    return time.perf_counter() - self.started
            except SupervisorError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"workers not running after {timeout}s:\n{self.log.read_text()[-2000:]}")

    def pid_of(self, name: str) -> int:
        return next(r.pid for r in self.control.processes() if r.name == name)

    def supervisord_pid(self) -> int:
        return psutil.Process(self.proc.pid).children()[0].pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def restart_latency(machine: Machine, kills: int) -> list[float]:
    samples = []
    info = machine.control._rpc  # one process, tight loop: raw XML-RPC, no policy merge
    for k in range(kills):
        name = f"worker-{k % 8}"
        old = machine.pid_of(name)
        os.kill(old, signal.SIGKILL)
        t0 = time.perf_counter()
        while True:
            row = info("supervisor.getProcessInfo", name)
            if row["pid"] not in (0, old) and row["statename"] == "RUNNING":
                break
            if time.perf_counter() - t0 > 5:
                raise RuntimeError(f"{name} not replaced within 5 s")
            time.sleep(0.001)  # poll gently: a busy loop here would compete with supervisord for the CPU
        samples.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.1)  # each worker is killed every ~0.8 s, past its 0.5 s reset_after: no backoff
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="embench") as tmp:
        boots = []
        for n in range(args.boots):
            machine = Machine(Path(tmp), n)
            boots.append(machine.wait_all_running(8))
            if n < args.boots - 1:
                machine.stop()
        time.sleep(2.0)  # let the last machine settle before measuring memory and restarts
        rss_machine = psutil.Process(machine.proc.pid).memory_info().rss
        rss_supervisord = psutil.Process(machine.supervisord_pid()).memory_info().rss
        samples = restart_latency(machine, args.kills)
        machine.stop()

    samples.sort()
    p95 = samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]
    results = {
        "restart_after_sigkill_ms": {"median": round(statistics.median(samples), 1), "p95": round(p95, 1),
                                     "max": round(samples[-1], 1), "kills": len(samples)},
        "rss_mb": {"machine": round(rss_machine / 2**20, 1), "supervisord": round(rss_supervisord / 2**20, 1),
                   "total": round((rss_machine + rss_supervisord) / 2**20, 1)},
        "boot_to_all_running_s": {"median": round(statistics.median(boots), 2), "max": round(max(boots), 2),
                                  "boots": len(boots)},
    }
    r = results
    rows = [
        ("SIGKILL -> replacement running, median", f"{r['restart_after_sigkill_ms']['median']} ms", "<= 50 ms",
         "PM2 ~9 ms, stock supervisord ~1,010 ms"),
        ("SIGKILL -> replacement running, p95", f"{r['restart_after_sigkill_ms']['p95']} ms", "", ""),
        ("RSS machine + supervisord, 8 workers", f"{r['rss_mb']['total']} MB "
         f"({r['rss_mb']['machine']} + {r['rss_mb']['supervisord']})", "<= 80 MB", "PM2 daemon ~56 MB"),
        ("boot to all 8 workers running, median", f"{r['boot_to_all_running_s']['median']} s", "<= 5 s", ""),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"{'figure':<{width}}  {'measured':<22} {'target':<10} reference")
    for name, value, target, ref in rows:
        print(f"{name:<{width}}  {value:<22} {target:<10} {ref}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

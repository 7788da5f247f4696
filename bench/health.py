"""Health server under load: /health and /status req/s and p99 with 50 loopback clients, CPU of 1 Hz polling.

    .venv/bin/python bench/health.py            (about 45 s; loopback only; its own private Redis)

Boots a real machine (8 simulation workers) and hits it with 50 keep-alive HTTP/1.1 clients written on raw
asyncio streams (the load generator shares the machine's cores: its cost is part of the figure). Then the
machine process's CPU share idle, and with /health polled once a second; RSS of machine + supervisord.
Writes docs/benchmarks-health.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emp_machine.runtime.redis_server import PrivateRedis  # noqa: E402

CLIENTS, LOAD_S, POLL_S = 50, 10.0, 10.0
TARGET_RPS, TARGET_P99_MS, TARGET_POLL_CPU = 3000, 20.0, 1.0


async def _client(port: int, path: str, until: float, lat: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def _load(port: int, path: str, seconds: float) -> tuple[float, float, float]:
    lat: list[float] = []
    until = time.perf_counter() + seconds
    start = time.perf_counter()
    await asyncio.gather(*(_client(port, path, until, lat) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - start
    lat.sort()
    return len(lat) / elapsed, lat[int(len(lat) * 0.99)] * 1000, lat[len(lat) // 2] * 1000


def _cpu_percent(proc: psutil.Process, seconds: float, poll_url: str | None) -> float:
    t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
    while time.monotonic() - t0 < seconds:
        if poll_url:
            urllib.request.urlopen(poll_url, timeout=5).read()
        time.sleep(1.0)
    return 100 * (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        redis = PrivateRedis(tmp_path / "redis").start()
        state = tmp_path / "state"
        manifest = tmp_path / "manifest.yaml"
        manifest.write_text(f"""machine: {{type: bench, id: bench-health, state_dir: {state}}}
redis: {{url: "{redis.url}"}}
health: {{port: 0}}
workers:
  sim: {{connector: simulation, count: 8, stop_grace: 5s}}
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
        out = open(tmp_path / "machine.out", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "emp_machine", "--manifest", str(manifest)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        try:
            pointer = state / "run" / "machine.json"
            deadline = time.monotonic() + 30
            port = None
            while time.monotonic() < deadline:
                try:
                    port = json.loads(pointer.read_text())["health_port"]
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except Exception:
                    pass
                time.sleep(0.2)
            else:
                print("machine did not become healthy within 30 s", file=sys.stderr)
                return 1
            machine = psutil.Process(proc.pid)
            sup = psutil.Process(int((state / "run" / "supervisord.pid").read_text()))
            time.sleep(1.0)
            rss_machine, rss_sup = machine.memory_info().rss, sup.memory_info().rss

            health = asyncio.run(_load(port, "/health", LOAD_S))
            status = asyncio.run(_load(port, "/status", LOAD_S))
            time.sleep(1.0)
            idle_cpu = _cpu_percent(machine, POLL_S / 2, None)
            poll_cpu = _cpu_percent(machine, POLL_S, f"http://127.0.0.1:{port}/health")
            rss_after = machine.memory_info().rss
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.close()
            redis.stop()

    mib = 2 ** 20
    rows = [
        ("/health req/s (50 clients, 10 s)", f"{health[0]:,.0f}", f">= {TARGET_RPS:,}", health[0] >= TARGET_RPS),
        ("/health p99 / p50 ms", f"{health[1]:.1f} / {health[2]:.1f}", f"p99 <= {TARGET_P99_MS:g}",
         health[1] <= TARGET_P99_MS),
        ("/status req/s (50 clients, 10 s)", f"{status[0]:,.0f}", f">= {TARGET_RPS:,}", status[0] >= TARGET_RPS),
        ("/status p99 / p50 ms", f"{status[1]:.1f} / {status[2]:.1f}", f"p99 <= {TARGET_P99_MS:g}",
         status[1] <= TARGET_P99_MS),
        ("machine CPU, /health polled 1/s (% of a core)", f"{poll_cpu:.2f}", f"< {TARGET_POLL_CPU:g}",
         poll_cpu < TARGET_POLL_CPU),
        ("machine CPU, idle, same machine (% of a core)", f"{idle_cpu:.2f}", "(reference)", None),
        ("RSS machine + supervisord, 8 workers (MiB)", f"{rss_machine / mib:.1f} + {rss_sup / mib:.1f} = "
         f"{(rss_machine + rss_sup) / mib:.1f}", "<= 80", (rss_machine + rss_sup) / mib <= 80),
        ("RSS machine after the load (MiB)", f"{rss_after / mib:.1f}", "", None),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value:>22}  {target:<12} {'' if ok is None else 'met' if ok else 'MISSED'}"
             for name, value, target, ok in rows]
    print("\n".join(lines))
    cond = (f"{os.cpu_count()} CPUs ({psutil.cpu_count(logical=False)} physical) shared with other work; load "
            f"generator in the same box (raw asyncio keep-alive clients, one process); Python "
            f"{sys.version.split()[0]}; load average at the end {os.getloadavg()[0]:.2f}")
    doc = ROOT / "docs" / "benchmarks-health.md"
    doc.write_text("# Health server benchmark\n\nCommand: `.venv/bin/python bench/health.py` (also `./dev bench health`)"
                   f"\n\nConditions: {cond}.\n\n| measure | value | target | |\n|---|---|---|---|\n" +
                   "".join(f"| {n} | {v} | {t} | {'' if ok is None else 'met' if ok else '**missed**'} |\n"
                           for n, v, t, ok in rows))
    print(f"\nwritten to {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Workers' meters on the machine's /metrics: real Telemetry instances publish snapshot files, a real health
server on loopback merges them (worker_id labels, one family each, stale and corrupt files left out)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections import Counter

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emp_machine.runtime import hardware, plan
from emp_machine.runtime import manifest as mf
from emp_machine.runtime.aggregate import Aggregator
from emp_machine.runtime.health import HealthServer, WorkerMetrics
from emp_machine.telemetry import TelemetryConfig, setup
from emp_machine.telemetry.metrics import SNAPSHOT_MAX_AGE, merge_snapshots, parse_snapshot
from otlp_receiver import wait_until


class Clock:
    """Wall time plus an offset the test moves (snapshot ages are judged against file mtimes)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def rig(tmp_path):
    """A two-worker plan, the machine's telemetry and both workers' telemetry writing under state/metrics."""
    state = tmp_path / "state"
    manifest = mf.loads(f"machine: {{type: test, id: wm, state_dir: {state}}}\n"
                        "redis: {url: 'redis://127.0.0.1:1'}\n"
                        "workers: {sim: {connector: simulation, count: 2}}\n", environ={})
    the_plan = plan.build(manifest, hardware.probe(), resolved_manifest=tmp_path / "manifest.json", environ={})
    ids = [w.worker_id for w in the_plan.workers]
    config = TelemetryConfig()
    machine = setup(config, machine_id="wm", service_type="machine", buffer_path=tmp_path / "machine.db",
                    stream=io.StringIO())
    workers = [setup(config, machine_id="wm", worker_id=wid, service_type="simulation",
                     buffer_path=tmp_path / f"{wid}.db", stream=io.StringIO(),
                     snapshot_path=state / "metrics" / f"{wid}.json", snapshot_interval=3600)
               for wid in ids]
    clock = Clock()
    source = WorkerMetrics(state / "metrics", ids, clock=clock, meter=machine.meter)
    server = HealthServer(Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url=""),
                          host="127.0.0.1", port=0, token=None, token_env="T", cors_origins=(),
                          process_names=set(), restart=lambda name: None, refresh=lambda: None,
                          metrics=lambda: source.render(machine.metrics_snapshot))
    yield ids, machine, workers, clock, server, state / "metrics"
    for tel in (machine, *workers):
        tel.shutdown(timeout=2)


def scrape(server: HealthServer, times: int = 1) -> list[tuple[int, str, str]]:
    """(status, content type, body) of GET /metrics, `times` times, from a real server on loopback."""
    async def run():
        port = await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                out = []
                for _ in range(times):
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        out.append((resp.status, resp.headers["Content-Type"], await resp.text()))
                return out
        finally:
            await server.stop()
    return asyncio.run(run())


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}, checking the exposition rules on the way: one TYPE line per
    family, no series twice, and prometheus_client parses it."""
    types = Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))
    assert all(n == 1 for n in types.values()), [name for name, n in types.items() if n > 1]
    keys = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1]
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def series(found: dict[tuple, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def test_workers_series_reach_the_machines_metrics_with_their_worker_id(rig):
    ids, machine, workers, clock, server, directory = rig
    w0, w1 = workers
    for _ in range(3):
        w0.metrics.job_finished("simulation", "completed", 0.2, ids[0])
    w0.connector_logger("sim-0", "simulation", "simulation").failed("job-9", RuntimeError("boom"), duration_ms=40)
    for _ in range(2):
        w1.metrics.job_finished("simulation", "completed", 0.02, ids[1])
    machine.metrics.workers_total.set(2, {"service": "simulation"})
    assert w0.publish_snapshot()
    w1.snapshot_interval = 0.05  # this one through the housekeeping thread, as a running worker does
    assert wait_until(lambda: (directory / f"{ids[1]}.json").exists(), timeout=5)
    # a file of a worker this machine does not run is not merged
    (directory / "someone-else.json").write_text((directory / f"{ids[0]}.json").read_text())

    (status, content_type, text), = scrape(server)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    found = samples(text)
    assert series(found, "jobs_processed_total", type="simulation", status="completed", worker_id=ids[0]) == 3
    assert series(found, "jobs_processed_total", type="simulation", status="failed", worker_id=ids[0]) == 1
    assert series(found, "jobs_processed_total", type="simulation", status="completed", worker_id=ids[1]) == 2
    assert series(found, "job_duration_seconds_count", type="simulation", worker_id=ids[1]) == 2
    assert series(found, "worker_job_duration_seconds_count", worker_id=ids[0]) == 4
    assert series(found, "worker_errors_total", kind="job_failed", worker_id=ids[0]) == 1
    assert series(found, "worker_memory_usage_bytes", worker_id=ids[0]) > 1_000_000
    assert series(found, "workers_total", service="simulation") == 2  # the machine's own, unlabelled
    assert series(found, "machine_uptime_seconds") is not None
    assert series(found, "telemetry_sampling_rate") is not None  # the machine's telemetry
    assert series(found, "telemetry_sampling_rate", worker_id=ids[1]) is not None  # and each worker's
    assert "someone-else" not in text
    assert not any(name == "jobs_processed_total" and "worker_id" not in dict(labels)
                   for name, labels in found)


def test_corrupt_or_half_written_snapshot_is_skipped_counted_once_and_logged(rig, caplog):
    ids, machine, workers, clock, server, directory = rig
    w0, w1 = workers
    w0.metrics.job_finished("simulation", "completed", 0.1, ids[0])
    w1.metrics.job_finished("simulation", "completed", 0.1, ids[1])
    assert w0.publish_snapshot() and w1.publish_snapshot()
    good = (directory / f"{ids[1]}.json").read_bytes()
    (directory / f"{ids[1]}.json").write_bytes(good[:len(good) // 2])  # as a non-atomic writer would leave it
    with caplog.at_level(logging.WARNING, logger="emp.machine.health"):
        scrapes = scrape(server, times=2)
    for status, _, text in scrapes:
        assert status == 200
        found = samples(text)
        assert series(found, "jobs_processed_total", type="simulation", status="completed", worker_id=ids[0]) == 1
        assert ids[1] not in text
        assert series(found, "telemetry_worker_snapshots_skipped_total", reason="corrupt") == 1  # once per version
    skipped = [r for r in caplog.records if r.getMessage() == "metrics.snapshot_skipped"]
    assert len(skipped) == 1 and skipped[0].fields["worker_id"] == ids[1]
    assert "not JSON" in skipped[0].fields["error"]

    # valid JSON of the wrong shape, then the worker's next snapshot: back in
    (directory / f"{ids[1]}.json").write_text(json.dumps({"version": 1, "worker_id": ids[1],
                                                          "metrics": [["x", "", "", "sum", True, [["no", 1]]]]}))
    found = samples(scrape(server)[0][2])
    assert series(found, "telemetry_worker_snapshots_skipped_total", reason="corrupt") == 2
    assert w1.publish_snapshot()
    found = samples(scrape(server)[0][2])
    assert series(found, "jobs_processed_total", type="simulation", status="completed", worker_id=ids[1]) == 1


def test_a_worker_gone_past_the_bound_stops_appearing(rig):
    ids, machine, workers, clock, server, directory = rig
    w0, w1 = workers
    w0.metrics.job_finished("simulation", "completed", 0.1, ids[0])
    w0.shutdown(timeout=2)  # a worker that exits writes its last snapshot
    w1.metrics.job_finished("simulation", "completed", 0.1, ids[1])
    assert w1.publish_snapshot()
    clock.offset = SNAPSHOT_MAX_AGE - 2
    found = samples(scrape(server)[0][2])
    assert series(found, "jobs_processed_total", type="simulation", status="completed", worker_id=ids[0]) == 1
    clock.offset = SNAPSHOT_MAX_AGE + 2
    text = scrape(server)[0][2]
    assert ids[0] not in text and ids[1] not in text
    assert "jobs_processed_total" not in text  # no family left without series
    # a running worker keeps rewriting its file: it is back as soon as it does
    clock.offset = 0
    assert w1.publish_snapshot()
    found = samples(scrape(server)[0][2])
    assert series(found, "jobs_processed_total", type="simulation", status="completed", worker_id=ids[1]) == 1
    assert ids[0] in scrape(server)[0][2]  # (its last snapshot is still fresh by the real clock)


def test_snapshot_write_failure_is_reported_once_and_never_raised(tmp_path):
    blocker = tmp_path / "metrics"
    blocker.write_text("a file where the directory should be")
    stream = io.StringIO()
    tel = setup(TelemetryConfig(), machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                buffer_path=tmp_path / "t.db", stream=stream, snapshot_path=blocker / "m1-worker-0.json",
                snapshot_interval=3600)
    try:
        assert tel.publish_snapshot() is False and tel.publish_snapshot() is False
    finally:
        tel.shutdown(timeout=2)
    failures = [json.loads(line) for line in stream.getvalue().splitlines() if "telemetry.snapshot_failed" in line]
    assert len(failures) == 1 and failures[0]["level"] == "warning"
    with pytest.raises(ValueError, match="snapshot_interval"):
        setup(TelemetryConfig(), machine_id="m1", service_type="x", buffer_path=tmp_path / "u.db",
              snapshot_interval=0)


def test_parse_and_merge_rules():
    with pytest.raises(ValueError, match="not JSON"):
        parse_snapshot(b'{"version": 1, "worker_id": "w", "metr')
    with pytest.raises(ValueError, match="histogram"):
        parse_snapshot(json.dumps({"version": 1, "worker_id": "w", "metrics": [
            ["h", "", "s", "histogram", False, [[{}, [1, 0.5, [1], [0.1]]]]]]}))
    own = [("jobs_processed_total", "jobs", "1", "sum", True, [({"type": "a"}, 1)])]
    hist = ("d", "", "s", "histogram", False, [({"worker_id": "w1"}, (1, 0.5, [0, 1], [0.1]))])
    merged = merge_snapshots(own, [
        ("w1", [("jobs_processed_total", "", "1", "sum", True, [({"type": "a"}, 2)]), hist]),
        ("w2", [("jobs_processed_total", "", "1", "gauge", False, [({"type": "a"}, 9)]),  # other kind: out
                ("d", "", "s", "histogram", False, [({"worker_id": "w1"}, (2, 1.0, [1, 1], [0.1]))])])])
    by_name = {f[0]: f for f in merged}
    assert by_name["jobs_processed_total"][5] == [({"type": "a"}, 1), ({"type": "a", "worker_id": "w1"}, 2)]
    assert by_name["jobs_processed_total"][1] == "jobs"
    assert by_name["d"][5] == [({"worker_id": "w1"}, (3, 1.5, [1, 2], [0.1]))]  # one series, summed

"""Orphan buffers: the files of processes that no longer exist (a worker group scaled down, a machine booted again
under another id on the same state dir) are adopted by the machine process at boot: shipped once, each record
with the resource of the process that made it, then removed. A file a live process holds is left alone.

Real files, real Buffers and shippers, a real OTLP/HTTP receiver; the last test boots real machines."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from harness import RunningMachine, machine_env, wait_for, write_manifest
from otlp_receiver import OtlpReceiver, attributes, free_port

from emp_machine.telemetry import TelemetryConfig, setup
from emp_machine.telemetry.buffer import inspect_buffer

_GROUPS = {"/v1/traces": "resource_spans", "/v1/logs": "resource_logs", "/v1/metrics": "resource_metrics"}


def _config(endpoint: str | None) -> TelemetryConfig:
    return TelemetryConfig(otlp_endpoint=endpoint or "", sampling={"spans_per_second": 1e9},
                           export={"interval": "0.1s", "max_backoff": "0.3s", "metrics_interval": "0.5s"})


def _process(directory: Path, endpoint: str | None, machine_id: str, worker_id: str | None, *, records: int = 5):
    """Telemetry of one process (as a worker or the machine sets it up), with `records` events and spans
    marked with its origin."""
    stream = io.StringIO()
    tel = setup(_config(endpoint), machine_id=machine_id, worker_id=worker_id,
                service_type="simulation" if worker_id else "machine", region="eu-test",
                buffer_path=directory / f"{worker_id or 'machine'}.db", stream=stream)
    tel.test_stream = stream  # its JSON lines, for the events
    origin = worker_id or machine_id
    for seq in range(records):
        tel.events.emit("test.record", origin=origin, seq=seq)
        with tel.tracer.start_as_current_span("service.call", attributes={"origin": origin, "seq": seq}):
            pass
    return tel


def _boot_down(directory: Path, machine_id: str, worker_ids: list[str]) -> None:
    """A boot whose collector is down all along: every record stays in the processes' files."""
    down = f"http://127.0.0.1:{free_port()}"
    for tel in [_process(directory, down, machine_id, None)] + [_process(directory, down, machine_id, w)
                                                               for w in worker_ids]:
        tel.shutdown(timeout=0.5)


def _received(receiver: OtlpReceiver) -> list[tuple[str, dict, dict]]:
    """(path, resource attributes, record attributes) of every span and log record received; metric records as
    (path, resource, {"time": time_unix_nano of their points})."""
    out = []
    for req in list(receiver.requests):
        for group in getattr(req.request, _GROUPS[req.path]):
            resource = attributes(group.resource.attributes)
            if req.path == "/v1/traces":
                out += [(req.path, resource, attributes(s.attributes)) for ss in group.scope_spans for s in ss.spans]
            elif req.path == "/v1/logs":
                out += [(req.path, resource, attributes(r.attributes)) for sl in group.scope_logs
                        for r in sl.log_records]
            else:
                times = {p.time_unix_nano for sm in group.scope_metrics for m in sm.metrics
                         for p in (list(m.sum.data_points) + list(m.gauge.data_points) + list(m.histogram.data_points))}
                out += [(req.path, resource, {"time": t}) for t in times]
    return out


def _of(received, origin: str):
    """The test records (events and spans) made by `origin`, as (path, resource)."""
    return [(path, resource) for path, resource, attrs in received if attrs.get("origin") == origin]


def _by_instance(received) -> Counter:
    """Records received by (service.instance.id, signal path); metric records by their distinct time."""
    return Counter((resource.get("service.instance.id"), path) for path, resource, _ in received)


def _pending(path: Path) -> dict[str, int]:
    report = inspect_buffer(path)
    return {"/v1/traces": report.pending.get(1, 0), "/v1/logs": report.pending.get(2, 0),
            "/v1/metrics": report.pending.get(3, 0)}


def _leftovers(directory: Path, name: str) -> list[str]:
    return sorted(entry for entry in os.listdir(directory) if entry.startswith(name))


def _events(tel, name: str) -> list[dict]:
    return [line for line in (json.loads(text) for text in tel.test_stream.getvalue().splitlines() if text)
            if line.get("message") == name]


def test_a_worker_scaled_away_is_shipped_once_with_its_own_resource_and_removed(tmp_path, receiver):
    _boot_down(tmp_path, "m1", ["m1-worker-0", "m1-worker-1"])
    expected = _pending(tmp_path / "m1-worker-1.db")
    assert expected["/v1/logs"] >= 5 and expected["/v1/traces"] == 5 and expected["/v1/metrics"] >= 1

    # Boot 2: one worker; the collector is up.
    machine = _process(tmp_path, receiver.endpoint, "m1", None, records=0)
    worker = _process(tmp_path, receiver.endpoint, "m1", "m1-worker-0", records=0)
    try:
        adopter = machine.adopt_orphan_buffers(["m1-worker-0"])
        assert adopter.done.wait(30), "the adoption did not finish"
        received = _received(receiver)
        counts = _by_instance(received)
        for path, count in expected.items():  # every record of the removed worker, once
            assert counts[("m1-worker-1", path)] == count, (path, counts)
        mine = _of(received, "m1-worker-1")
        assert len(mine) == 10
        for _, resource in mine:  # its resource, not the machine's
            assert resource["service.instance.id"] == "m1-worker-1"
            assert resource["worker.id"] == "m1-worker-1"
            assert resource["machine.id"] == "m1"
            assert resource["service.type"] == "simulation"
            assert resource["cloud.region"] == "eu-test"
        assert _leftovers(tmp_path, "m1-worker-1.db") == []  # db, -wal, -shm, stage and lock files
        assert adopter.adopted == [{"file": "m1-worker-1.db", "shipped": {"spans": expected["/v1/traces"],
                                    "logs": expected["/v1/logs"], "metrics": expected["/v1/metrics"]},
                                    "pending": 0, "dead_letters": 0, "removed": True}]
        found = _events(machine, "telemetry.orphan_buffers")
        assert [f["file"] for f in found[0]["files"]] == ["m1-worker-1.db"]
        assert found[0]["files"][0]["pending"] == sum(expected.values())
        assert (tmp_path / "m1-worker-0.db").exists()  # a process of the plan keeps its file
    finally:
        worker.shutdown(timeout=2)
        machine.shutdown(timeout=2)


def test_records_of_an_earlier_machine_id_go_with_that_id(tmp_path, receiver):
    _boot_down(tmp_path, "alpha", ["alpha-worker-0"])
    expected = _pending(tmp_path / "alpha-worker-0.db")

    # Boot 2 on the same state dir as "beta": machine.db is the same file, the worker's is another.
    machine = _process(tmp_path, receiver.endpoint, "beta", None)
    worker = _process(tmp_path, receiver.endpoint, "beta", "beta-worker-0")
    try:
        adopter = machine.adopt_orphan_buffers(["beta-worker-0"])
        assert adopter.done.wait(30), "the adoption did not finish"
    finally:
        worker.shutdown(timeout=5)
        machine.shutdown(timeout=5)
    received = _received(receiver)
    counts = _by_instance(received)
    for path, count in expected.items():
        assert counts[("alpha-worker-0", path)] == count, (path, counts)
    for origin, machine_id, instance in (("alpha-worker-0", "alpha", "alpha-worker-0"), ("alpha", "alpha", "alpha"),
                                         ("beta-worker-0", "beta", "beta-worker-0"), ("beta", "beta", "beta")):
        mine = _of(received, origin)
        assert len(mine) == 10, (origin, len(mine))  # 5 events and 5 spans, each once
        assert {(r["machine.id"], r["service.instance.id"]) for _, r in mine} == {(machine_id, instance)}, origin
    assert _leftovers(tmp_path, "alpha-worker-0.db") == []
    assert (tmp_path / "machine.db").exists() and _pending(tmp_path / "machine.db") == {
        "/v1/traces": 0, "/v1/logs": 0, "/v1/metrics": 0}


HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from emp_machine.telemetry.buffer import Buffer, Kind, Value
    buffer = Buffer(Path(sys.argv[1]))
    buffer.append(Kind.LOG, Value.NORMAL, (1, 9, "INFO", "held", {"origin": "holder"}, b"", b"", ""))
    assert buffer.flush(10)
    print("holding", flush=True)
    sys.stdin.readline()
    buffer.close()
""")


def test_a_file_a_live_process_holds_is_left_alone(tmp_path, receiver):
    _boot_down(tmp_path, "m1", ["m1-worker-2"])  # an orphan, to show the adoption ran
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "m1-worker-1.db")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    machine = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        machine = _process(tmp_path, receiver.endpoint, "m1", None, records=0)
        adopter = machine.adopt_orphan_buffers([])
        assert adopter.done.wait(30), "the adoption did not finish"
        assert [entry["file"] for entry in adopter.adopted] == ["m1-worker-2.db"]
        assert _leftovers(tmp_path, "m1-worker-2.db") == []
        assert (tmp_path / "m1-worker-1.db").exists() and (tmp_path / "m1-worker-1.db.lock").exists()
        assert _pending(tmp_path / "m1-worker-1.db")["/v1/logs"] == 1
        assert inspect_buffer(tmp_path / "m1-worker-1.db").owner_running is True
        assert not [r for r in _received(receiver) if r[2].get("origin") == "holder"]
        listed = {entry["file"]: entry for entry in _events(machine, "telemetry.orphan_buffers")[0]["files"]}
        assert listed["m1-worker-1.db"] == {"file": "m1-worker-1.db", "in_use": True}
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
        if machine is not None:
            machine.shutdown(timeout=2)


def test_without_an_endpoint_orphans_are_named_and_kept(tmp_path):
    _boot_down(tmp_path, "m1", ["m1-worker-1"])
    expected = sum(_pending(tmp_path / "m1-worker-1.db").values())
    machine = _process(tmp_path, None, "m1", None, records=0)
    try:
        adopter = machine.adopt_orphan_buffers([])
        assert adopter.done.wait(30), "the adoption did not finish"
        found = _events(machine, "telemetry.orphan_buffers")
        assert found and found[0]["level"] == "warning"
        assert found[0]["files"] == [{"file": "m1-worker-1.db", "pending": expected, "dead_letters": 0}]
        assert adopter.adopted == [{"file": "m1-worker-1.db", "pending": expected, "dead_letters": 0,
                                    "removed": False}]
        assert sum(_pending(tmp_path / "m1-worker-1.db").values()) == expected  # kept, within the retention
    finally:
        machine.shutdown(timeout=2)


def test_a_machine_scaled_down_between_boots_ships_the_removed_workers_file(tmp_path, redis_url):
    """Real machines: boot 1 with 2 workers and the collector down, boot 2 with 1 worker and the collector up."""
    port = free_port()

    def body(count: int) -> str:
        return f"""
        telemetry:
          otlp_endpoint: http://127.0.0.1:{port}
          export: {{interval: 0.2s, metrics_interval: 1s}}
        workers:
          sim:
            connector: simulation
            count: {count}
            stop_grace: 5s
        """

    machine_id = f"test-{tmp_path.name}"
    gone = f"{machine_id}-worker-1"
    orphan = tmp_path / "telemetry" / f"{gone}.db"
    m = RunningMachine(write_manifest(tmp_path / "manifest.yaml", body(2), tmp_path, redis_url), tmp_path,
                       machine_env())
    try:
        m.wait_ready(60)
        wait_for(lambda: '"worker.spawned"' in m.log_of("worker-1"), 60, message="worker-1 spawned")
        wait_for(lambda: orphan.exists() and sum(_pending(orphan).values()), 30, message="worker-1's records")
        m.signal(signal.SIGTERM)
        assert m.wait_exit(60) == 0
    finally:
        m.close()
    expected = _pending(orphan)
    receiver = OtlpReceiver(port).start()
    m = RunningMachine(write_manifest(tmp_path / "manifest.yaml", body(1), tmp_path, redis_url), tmp_path,
                       machine_env())
    try:
        m.wait_ready(60)
        wait_for(lambda: not orphan.exists(), 60, message=f"{orphan.name} shipped and removed\n{m.tail()}")
        m.wait_event("telemetry.orphan_buffer_adopted", 10, file=orphan.name, removed=True)  # said after it
        m.signal(signal.SIGTERM)
        assert m.wait_exit(60) == 0
    finally:
        m.close()
        receiver.stop()
    received = _received(receiver)
    counts = _by_instance(received)
    for path, count in expected.items():
        assert counts[(gone, path)] == count, (path, counts)
    resources = {json.dumps(r, sort_keys=True) for _, r, _ in received if r.get("service.instance.id") == gone}
    assert [json.loads(r)["worker.id"] for r in resources] == [gone]
    assert [json.loads(r)["service.type"] for r in resources] == ["simulation"]
    assert _leftovers(tmp_path / "telemetry", orphan.name) == []


def test_a_resource_not_recorded_at_open_is_recorded_with_the_first_records(tmp_path):
    # The open must not fail for it (a full disk: records would only wait in memory), and no record of the new
    # owner may be committed under the earlier owner's resource.
    from emp_machine.telemetry.buffer import Buffer, Kind, Value

    path = tmp_path / "w.db"
    first = Buffer(path, resource={"service.instance.id": "a"})
    first.append(Kind.LOG, Value.NORMAL, (1, 9, "INFO", "by a", {}, b"", b"", ""))
    assert first.flush(10)
    first.close()

    class RefusedAtOpen(Buffer):
        def _register_resource(self) -> None:
            self._db.execute("PRAGMA query_only = ON")  # SQLite refuses every write, as on a full disk
            try:
                super()._register_resource()
            finally:
                self._db.execute("PRAGMA query_only = OFF")

    second = RefusedAtOpen(path, resource={"service.instance.id": "b"})
    try:
        assert second.open_error is None and second._resource_unsaved
        second.append(Kind.LOG, Value.NORMAL, (2, 9, "INFO", "by b", {}, b"", b"", ""))
        assert second.flush(10)
        chunks = second.read(Kind.LOG, 10)
        assert [(c.records[0][3], json.loads(second.resource_of(c.id))) for c in chunks] == [
            ("by a", {"service.instance.id": "a"}), ("by b", {"service.instance.id": "b"})]
    finally:
        second.close()


def test_drops_found_while_adopting_are_counted_and_reported_by_the_adopter(tmp_path, receiver):
    import time

    from emp_machine.telemetry.buffer import Buffer, Kind, Value

    # An orphan whose records were committed two hours ago: past the retention (1 h), expired when adopted.
    old = Buffer(tmp_path / "m1-worker-3.db", resource={"service.instance.id": "m1-worker-3"},
                 clock=lambda: time.time() - 7200)
    for i in range(7):
        old.append(Kind.LOG, Value.NORMAL, (i, 9, "INFO", "old", {"origin": "m1-worker-3"}, b"", b"", ""))
    assert old.flush(10)
    old.close()
    machine = _process(tmp_path, receiver.endpoint, "m1", None, records=0)
    try:
        adopter = machine.adopt_orphan_buffers([])
        assert adopter.done.wait(30), "the adoption did not finish"
        assert adopter.adopted == [{"file": "m1-worker-3.db", "shipped": {"spans": 0, "logs": 0, "metrics": 0},
                                    "pending": 0, "dead_letters": 0, "dropped": {"expired": 7}, "removed": True}]
        assert machine.buffer.stats().dropped == {"expired": 7}  # in the machine's own file: it outlives the orphan
        wait_for(lambda: _events(machine, "telemetry.records_dropped"), 10, message="the drop reported")
        assert [(e["reason"], e["count"]) for e in _events(machine, "telemetry.records_dropped")] == [("expired", 7)]
        assert not [r for r in _received(receiver) if r[2].get("origin") == "m1-worker-3"]
        assert _leftovers(tmp_path, "m1-worker-3.db") == []
    finally:
        machine.shutdown(timeout=2)


def test_an_orphan_the_collector_does_not_take_is_left_and_the_next_one_gets_its_turn(tmp_path, monkeypatch):
    # The adopter waited on the first file as long as its records stayed pending: with the collector down all
    # boot, no other orphan got its retention or its shipping.
    from emp_machine.telemetry import orphans

    monkeypatch.setattr(orphans, "ORPHAN_STALL_S", 0.5)
    _boot_down(tmp_path, "m1", ["m1-worker-1", "m1-worker-2"])
    down = f"http://127.0.0.1:{free_port()}"
    machine = _process(tmp_path, down, "m1", None, records=0)
    try:
        adopter = machine.adopt_orphan_buffers([])
        assert adopter.done.wait(30), f"the adoption did not finish: {adopter.adopted}"
        assert [entry["file"] for entry in adopter.adopted] == ["m1-worker-1.db", "m1-worker-2.db"]
        assert all(entry["stalled_s"] == 0.5 and entry["removed"] is False and entry["pending"]
                   for entry in adopter.adopted), adopter.adopted
    finally:
        machine.shutdown(timeout=2)


def test_an_orphan_holding_only_dead_letters_is_kept_with_them(tmp_path):
    # Dead letters are kept (issue 3): an adopted file with nothing left to send but dead letters is not
    # removed (mutation audit M5: removing it, dead letters and all, passed every test).
    from emp_machine.telemetry.buffer import Buffer, Kind, Value
    from emp_machine.telemetry.orphans import OrphanAdopter

    path = tmp_path / "old-worker-1.db"
    orphan = Buffer(path)
    orphan.append(Kind.SPAN, Value.ROUTINE, (0, "a span the collector refused"))
    orphan.flush()
    (chunk,) = orphan.read(Kind.SPAN, 10)
    orphan.dead_letter(Kind.SPAN, chunk.records, [(chunk.id, chunk.count)], "HTTP 400")
    orphan.close()
    adopter = OrphanAdopter(tmp_path, [], make_buffer=lambda p: Buffer(p), make_shipper=None,
                            emit=lambda name, level, fields: None).start()
    assert adopter.done.wait(30)
    assert [a["removed"] for a in adopter.adopted] == [False], adopter.adopted
    kept = Buffer(path)
    try:
        assert [(kind, count, reason) for kind, count, reason, _ in kept.dead_letters()] == [(Kind.SPAN, 1, "HTTP 400")]
    finally:
        kept.close()

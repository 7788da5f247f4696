"""Wall-clock steps (an NTP correction of a host booted with its clock unset, a clock set by hand) must not
change what telemetry keeps or reports: buffered records' ages, span durations and the slow-job rule, the
machine's uptime. Each clock has a seam a test steps (CI has no libfaketime): the buffer's `clock`/`monotonic`
parameters, tracing's `_time_ns`/`_monotonic_ns`, the aggregator's `clock`/`monotonic`, standard's `_monotonic`.
Also: a record larger than the whole buffer is dropped on its own (`oversize`), not after everything else."""

from __future__ import annotations

import json
import random
import string
import time

import pytest

from emp_machine.telemetry import standard, tracing
from emp_machine.telemetry.buffer import Buffer, Kind, Value, inspect_buffer
from emp_machine.telemetry.metrics import Meter
from emp_machine.telemetry.sampling import AdaptiveSampler
from emp_machine.telemetry.standard import StandardMetrics
from emp_machine.telemetry.tracing import Tracer


class Clocks:
    """A wall clock and an elapsed (monotonic) clock a test moves apart: a step moves only the wall one."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.elapsed = 5_000.0

    def pass_time(self, seconds: float) -> None:
        self.wall += seconds
        self.elapsed += seconds

    def step(self, seconds: float) -> None:
        self.wall += seconds


def _log(i: int, body: str = "") -> tuple:
    return (1_800_000_000_000_000_000 + i, 17, "ERROR", body or f"record {i}", {"i": i}, 0, 0, "")


def _buffer(path, clocks: Clocks, **kwargs) -> Buffer:
    return Buffer(path, retention=3600, clock=lambda: clocks.wall, monotonic=lambda: clocks.elapsed, **kwargs)


def _pending_ids(buffer: Buffer) -> list[int]:
    return [record[4]["i"] for chunk in buffer.read(Kind.LOG, 100_000) for record in chunk.records]


# --- the buffer's retention -------------------------------------------------------------------------------

def test_a_wall_clock_step_forward_does_not_expire_records_that_are_seconds_old(tmp_path):
    # The audit: a machine whose wall clock was stepped 2 h forward dropped its 17 unshipped records, ~30 s old,
    # as `expired` (retention 1 h compared commit wall times with the stepped wall clock).
    clocks = Clocks()
    drops: list[tuple[str, int]] = []
    buffer = _buffer(tmp_path / "b.db", clocks, on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        for i in range(17):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        assert buffer.flush()
        clocks.pass_time(30)
        clocks.step(7200)
        buffer.append(Kind.LOG, Value.NORMAL, _log(17))
        assert buffer.flush()  # a commit and a retention pass, by the stepped clock
        assert buffer.stats().dropped == {} and drops == []
        assert buffer.pending() == 18  # (not read: a chunk handed to the shipper is a pending drop, not counted)
        assert buffer.clock_steps == 1
        # The stored times moved with the step: readers (`emp-machine telemetry`) see the records' real age.
        oldest = inspect_buffer(tmp_path / "b.db").oldest_created
        assert clocks.wall - oldest == pytest.approx(30, abs=1)
        # They still expire, once they really are older than the retention.
        clocks.pass_time(3600 - 29)
        buffer.append(Kind.LOG, Value.NORMAL, _log(18))
        assert buffer.flush()
        assert buffer.stats().dropped == {"expired": 17}
        assert _pending_ids(buffer) == [17, 18]
    finally:
        buffer.close()


def test_a_wall_clock_step_back_does_not_keep_records_past_the_retention(tmp_path):
    clocks = Clocks()
    buffer = _buffer(tmp_path / "b.db", clocks)
    try:
        for i in range(5):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        assert buffer.flush()
        clocks.pass_time(10)
        clocks.step(-3600)  # the retention pass also keeps its rhythm: it is timed by the elapsed clock
        buffer.append(Kind.LOG, Value.NORMAL, _log(5))
        assert buffer.flush()
        assert buffer.stats().dropped == {}
        clocks.pass_time(3595)  # the first five are 3605 s old now, the sixth 3595 s
        buffer.append(Kind.LOG, Value.NORMAL, _log(6))
        assert buffer.flush()
        assert buffer.stats().dropped == {"expired": 5}
        assert _pending_ids(buffer) == [5, 6]
    finally:
        buffer.close()


def test_small_differences_between_the_clocks_are_no_step(tmp_path):
    clocks = Clocks()
    buffer = _buffer(tmp_path / "b.db", clocks)
    try:
        for i in range(3):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
            assert buffer.flush()
            clocks.pass_time(100)
            clocks.step(0.5)  # jitter of two readings: never moves the stored times
        assert buffer.clock_steps == 0
    finally:
        buffer.close()



class StallingClocks(Clocks):
    """Clocks whose wall reading is followed by a stall (swap, a stopped container, a long GIL hold, a preempted
    thread) of `stall_s` for the next `stalls` readings: the elapsed clock read just after it is that much later,
    and so is the wall clock at the next reading. A stall is no step: the two clocks move together."""

    def __init__(self) -> None:
        super().__init__()
        self.stalls = 0
        self.stall_s = 0.0

    def read_wall(self) -> float:
        wall = self.wall
        if self.stalls:
            self.stalls -= 1
            self.pass_time(self.stall_s)
        return wall


def _created(path) -> list[float]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT created FROM chunks ORDER BY id")]
    finally:
        db.close()


def test_a_stall_between_the_clock_readings_is_no_step(tmp_path, capfd):
    # The review: a stall of >= 2 s between the wall and the elapsed reading read as a step (-5 s here): every
    # stored chunk was moved by it, the next clean reading "corrected" it back (+5 s), two false report lines,
    # clock_steps 2.
    clocks = StallingClocks()
    buffer = Buffer(tmp_path / "b.db", retention=3600, clock=clocks.read_wall, monotonic=lambda: clocks.elapsed)
    try:
        buffer.append(Kind.LOG, Value.NORMAL, _log(0))
        assert buffer.flush()
        first = clocks.wall
        clocks.pass_time(10)
        clocks.stalls, clocks.stall_s = 1, 5.0  # one stalled reading: taken again
        buffer.append(Kind.LOG, Value.NORMAL, _log(1))
        assert buffer.flush()
        assert buffer.clock_steps == 0
        assert _created(tmp_path / "b.db") == [first, clocks.wall]
        clocks.pass_time(10)
        clocks.stalls = 3  # every reading of a commit stalled: no step is measured, the reference stays
        buffer.append(Kind.LOG, Value.NORMAL, _log(2))
        assert buffer.flush()
        assert buffer.clock_steps == 0
        assert _created(tmp_path / "b.db") == [first, first + 15, clocks.wall]
        clocks.pass_time(10)
        buffer.append(Kind.LOG, Value.NORMAL, _log(3))
        assert buffer.flush()
        assert buffer.clock_steps == 0 and buffer.stats().dropped == {}
        assert _created(tmp_path / "b.db") == [first, first + 15, first + 40, clocks.wall]
        assert "stepped" not in capfd.readouterr().err
    finally:
        buffer.close()


def test_a_step_hidden_by_a_stalled_reading_is_corrected_once_at_the_next_clean_one(tmp_path):
    # A chunk stamped while no reading could be trusted gets the reference's time, so the step seen at the next
    # clean reading (here: the retention pass of the same flush) moves it with the others, and only once.
    clocks = StallingClocks()
    buffer = Buffer(tmp_path / "b.db", retention=3600, clock=clocks.read_wall, monotonic=lambda: clocks.elapsed)
    try:
        buffer.append(Kind.LOG, Value.NORMAL, _log(0))
        assert buffer.flush()
        first = clocks.wall
        clocks.pass_time(10)
        clocks.step(3600)
        clocks.stalls, clocks.stall_s = 3, 1.0
        buffer.append(Kind.LOG, Value.NORMAL, _log(1))
        assert buffer.flush()
        assert buffer.clock_steps == 1
        assert _created(tmp_path / "b.db") == [first + 3600, clocks.wall]
    finally:
        buffer.close()

# --- one record larger than the whole buffer ------------------------------------------------------------------

def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=n))


def test_a_record_larger_than_the_whole_buffer_is_dropped_alone(tmp_path):
    # The audit (p6b): 600 error records, then one 3 MB error log over a 1 MB buffer: the size cap dropped
    # all 600, then the big one itself (pending 0, 601 buffer_full).
    rng = random.Random(6)
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", max_size=1_000_000, on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        for i in range(600):
            buffer.append(Kind.LOG, Value.ERROR, _log(i, _random_text(rng, 1000)))
        assert buffer.flush()
        buffer.append(Kind.LOG, Value.ERROR, _log(600, _random_text(rng, 3 * 1024 * 1024)))
        buffer.append(Kind.LOG, Value.ERROR, _log(601))  # committed with it, in the same chunk: kept
        assert buffer.flush()
        assert buffer.stats().dropped == {"oversize": 1} and drops == [("oversize", 1)]
        assert _pending_ids(buffer) == [*range(600), 601]
        assert buffer.stats().stored_records == 601 and buffer.stats().stored_bytes <= 1_000_000
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db", max_size=1_000_000)
    try:
        assert reopened.stats().dropped == {"oversize": 1}  # persisted like every drop count
    finally:
        reopened.close()


def test_a_chunk_over_the_cap_is_split_and_only_the_oldest_part_goes(tmp_path):
    # 100 records committed together make one chunk over the cap, though each is small: split, not dropped whole.
    rng = random.Random(7)
    buffer = Buffer(tmp_path / "b.db", max_size=60_000)
    try:
        for i in range(100):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i, _random_text(rng, 1000)))
        assert buffer.flush()
        stats = buffer.stats()
        assert "oversize" not in stats.dropped and stats.stored_bytes <= 60_000
        pending = _pending_ids(buffer)
        assert pending and pending == list(range(100 - len(pending), 100))  # the newest kept, in order
    finally:
        buffer.close()


def test_a_stored_chunk_over_a_lowered_cap_goes_first_on_its_own(tmp_path):
    rng = random.Random(8)
    buffer = Buffer(tmp_path / "b.db", max_size=10_000_000)
    try:
        for i in range(50):
            buffer.append(Kind.LOG, Value.ERROR, _log(i, _random_text(rng, 1000)))
        assert buffer.flush()
        buffer.append(Kind.LOG, Value.ERROR, _log(50, _random_text(rng, 300_000)))
        assert buffer.flush()
    finally:
        buffer.close()
    lowered = Buffer(tmp_path / "b.db", max_size=200_000)
    try:
        lowered.append(Kind.LOG, Value.ERROR, _log(51))
        assert lowered.flush()
        assert lowered.stats().dropped == {"oversize": 1}
        assert _pending_ids(lowered) == [*range(50), 51]
    finally:
        lowered.close()


# --- spans --------------------------------------------------------------------------------------------------

class FakeNs:
    """tracing's wall and monotonic clocks, in ns. The next `stalls` wall readings are followed by a stall of
    `stall_ns` (a thread preempted under load): the monotonic clock read just after it is that much later."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000 * 10**9
        self.mono = 7_000 * 10**9
        self.stalls = 0
        self.stall_ns = 0

    def pass_time(self, ns: int) -> None:
        self.wall += ns
        self.mono += ns

    def read_wall(self) -> int:
        wall = self.wall
        if self.stalls:
            self.stalls -= 1
            self.pass_time(self.stall_ns)
        return wall


@pytest.fixture
def ns_clocks(monkeypatch):
    clocks = FakeNs()
    monkeypatch.setattr(tracing, "_time_ns", clocks.read_wall)
    monkeypatch.setattr(tracing, "_monotonic_ns", lambda: clocks.mono)
    monkeypatch.setattr(tracing, "_wall_anchor_ns", clocks.wall - clocks.mono)  # restored after the test
    return clocks


def _tracer(slow_job_s: float = 30.0) -> tuple[Tracer, list]:
    kept: list[tuple] = []
    sampler = AdaptiveSampler(1e9, clock=lambda: 1000.0, span_budget_us=float("inf"))
    sampler.next_adjust = float("inf")  # (no window ends unless a test says so)
    return Tracer(sampler, kept.append, clock=lambda: 1000.0, slow_job_s=slow_job_s), kept


def test_a_span_across_a_backward_wall_step_keeps_its_real_duration(ns_clocks):
    # The audit: a job spanning a 1 h step back exported -3,589,933 ms.
    tracer, kept = _tracer()
    with tracer.start_as_current_span("job.execution"):
        with tracer.start_as_current_span("service.call") as call:
            ns_clocks.pass_time(500_000_000)
            ns_clocks.wall -= 3600 * 10**9
            call.add_event("progress")
            ns_clocks.pass_time(250_000_000)
        ns_clocks.pass_time(1_000_000)
    spans = {record[3]: record for _, _, record in kept}
    assert spans["service.call"][6] - spans["service.call"][5] == 750_000_000
    assert spans["job.execution"][6] - spans["job.execution"][5] == 751_000_000
    started = spans["job.execution"][5]
    assert started == 1_800_000_000 * 10**9  # on the clock the process anchored to
    (event,) = spans["service.call"][10]
    assert event[0] - started == 500_000_000


def test_a_forward_wall_step_does_not_make_a_fast_job_slow(ns_clocks):
    # The slow-job rule (end - start >= slow_job) read the stepped difference: an unsampled, fast job that
    # spanned a step forward was kept as "slow".
    tracer, kept = _tracer(slow_job_s=30)
    tracer.sampler.threshold = 0  # unsampled: kept only when failed or slow
    with tracer.start_as_current_span("job.execution"):
        ns_clocks.pass_time(100_000_000)
        ns_clocks.wall += 3600 * 10**9
    assert kept == [] and tracer.tail_kept_jobs == 0 and tracer.dropped_spans == 1
    with tracer.start_as_current_span("job.execution"):  # a job really slower than slow_job is still kept
        ns_clocks.pass_time(31 * 10**9)
    assert len(kept) == 1 and tracer.tail_kept_jobs == 1


def test_the_anchor_follows_a_corrected_wall_clock_without_changing_durations(ns_clocks):
    tracer, kept = _tracer()
    span = tracer.start_span("long")
    ns_clocks.pass_time(2 * 10**9)
    ns_clocks.wall += 7200 * 10**9  # NTP corrects the clock
    tracer.sampler.next_adjust = 0.0
    tracer.sampler.maybe_adjust()  # once a sampler window (here: a due one), the anchor is taken again
    span.end()
    after = tracer.start_span("after")
    ns_clocks.pass_time(10**6)
    after.end(end_time=ns_clocks.wall + 10**6)  # an explicit wall end time, converted with the anchor
    (_, _, long), (_, _, short) = kept
    assert long[6] - long[5] == 2 * 10**9 and long[6] == ns_clocks.wall - 10**6
    assert short[5] == ns_clocks.wall - 10**6 and short[6] - short[5] == 2 * 10**6



def _sampler_window(tracer: Tracer) -> None:
    tracer.sampler.next_adjust = 0.0
    tracer.sampler.maybe_adjust()  # a due sampler window: the anchor is read again


def test_a_stalled_anchor_reading_does_not_move_the_anchor(ns_clocks):
    # The review: a thread preempted 30 ms between time_ns() and monotonic_ns() took an anchor off by 30 ms, over
    # the 1 ms threshold: a child span written under it started before its parent, written under the next one.
    tracer, kept = _tracer()
    anchor = tracing._wall_anchor_ns
    with tracer.start_as_current_span("parent"):
        ns_clocks.pass_time(10**6)
        with tracer.start_as_current_span("child"):
            ns_clocks.pass_time(10**6)
            ns_clocks.stalls, ns_clocks.stall_ns = 1, 30 * 10**6  # one stalled reading of three: not used
            _sampler_window(tracer)
            assert tracing._wall_anchor_ns == anchor
            ns_clocks.pass_time(10**6)
        ns_clocks.stalls, ns_clocks.stall_ns = 3, 20 * 10**6  # all three: off by half the stall, under 50 ms
        _sampler_window(tracer)
        assert tracing._wall_anchor_ns == anchor
        ns_clocks.pass_time(10**6)
        _sampler_window(tracer)
    spans = {record[3]: record for _, _, record in kept}
    parent, child = spans["parent"], spans["child"]
    assert parent[5] < child[5] < child[6] < parent[6]
    assert child[5] - parent[5] == 10**6
    # A real step is still followed, exactly, though a reading of it stalled.
    ns_clocks.wall += 2 * 10**9
    ns_clocks.stalls, ns_clocks.stall_ns = 1, 40 * 10**6
    _sampler_window(tracer)
    assert tracing._wall_anchor_ns == anchor + 2 * 10**9

# --- uptime -------------------------------------------------------------------------------------------------

def test_machine_uptime_ignores_wall_clock_steps(tmp_path):
    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime import manifest as mf
    from emp_machine.runtime.aggregate import Aggregator

    manifest = mf.loads(f"machine: {{type: test, id: up, state_dir: {tmp_path / 'state'}}}\n"
                        "redis: {url: 'redis://127.0.0.1:1'}\n"
                        "workers: {sim: {connector: simulation, count: 1}}\n", environ={})
    the_plan = plan.build(manifest, hardware.probe(), resolved_manifest=tmp_path / "manifest.json", environ={})
    clocks = Clocks()
    agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="", clock=lambda: clocks.wall,
                     monotonic=lambda: clocks.elapsed)
    clocks.pass_time(36)
    clocks.step(-3600)  # the audit: /health said uptime_s=-3564
    agg.dirty = True
    agg.commit()
    health = json.loads(agg.health_body)
    assert health["uptime_s"] == 36.0
    assert agg.status_doc["status"]["machine"]["uptime_ms"] == 36_000
    clocks.step(7200)
    agg.dirty = True
    agg.commit()
    assert json.loads(agg.health_body)["uptime_s"] == 36.0


def test_machine_uptime_seconds_ignores_wall_clock_steps(monkeypatch):
    elapsed = [100.0]
    monkeypatch.setattr(standard, "_monotonic", lambda: elapsed[0])
    meter = Meter()
    StandardMetrics(meter, system=True)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # a step back after the start
    elapsed[0] += 12

    def uptime() -> float:
        (points,) = [f[5] for f in meter.snapshot() if f[0] == "machine_uptime_seconds"]
        return points[0][1]

    assert uptime() == pytest.approx(12)

"""The adaptive sampler's dynamics: a pause read by one timed span, stale cost data, a stalled window, and the
first second of a load step or of a process. (Budget convergence and the CPU control are tested in
test_telemetry_tracing.py.) The sampler's clock is injected; the per-span costs are timed samples."""

from __future__ import annotations

import threading

import pytest

from emp_machine.telemetry.sampling import AdaptiveSampler, OverheadMeter
from emp_machine.telemetry.tracing import Tracer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tracer(budget: float, clock: FakeClock, *, span_budget_us: float = float("inf"), emit=None):
    kept: list[tuple] = []
    sampler = AdaptiveSampler(budget, clock=clock, meter=OverheadMeter(), cpu_budget=float("inf"),
                              span_budget_us=span_budget_us)
    return Tracer(sampler, emit or kept.append, clock=clock), kept


def test_one_pause_inside_a_timed_span_does_not_hold_the_rate_down():
    # One timed sample spanning a pause (SIGSTOP, a CPU-quota throttle, a GC, a thread switch) is wall time, not
    # telemetry's cost: it moved the average far over span_us, the factor halved each second to its floor
    # (0.01) and stayed there for minutes, as almost no span is timed at the floor (0-12 spans/s kept for 80 s
    # against a budget of 200). A sample now counts at most 4x the budget.
    clock = FakeClock()
    pause = threading.Event()
    kept: list[tuple] = []

    def emit(item: tuple) -> None:
        if pause.is_set():
            pause.clear()
            threading.Event().wait(0.15)  # the pause: this thread is held up inside the timed span's end()
        kept.append(item)

    tracer, _ = _tracer(1e9, clock, span_budget_us=100, emit=emit)
    sampler, meter = tracer.sampler, tracer.meter
    for _ in range(20):
        meter.sample_span(5_000)  # the average so far: 5 us a span
    tracer._n = 32  # the 32nd span from here is the next timed one (1 in 32, at random gaps)
    for i in range(32):
        if i == 31:
            pause.set()
        tracer.start_span("x").end()
    assert meter.span_samples == 21 and not pause.is_set()
    assert meter.span_ns <= 0.9 * 5_000 + 0.1 * 400_000 + 1  # the pause counted as at most 4 x 100 us
    clock.now += 1.0
    sampler.maybe_adjust()
    assert sampler.overhead_factor == 1.0 and sampler.rate == 1.0


def test_the_span_cost_is_judged_on_fresh_samples_only():
    # Spans that really cost over the budget still halve the factor; once the rate is down, windows with no
    # new timed span (at the floor almost none is timed) no longer halve it again on the old average.
    clock = FakeClock()
    tracer, _ = _tracer(1e9, clock, span_budget_us=100)
    sampler, meter = tracer.sampler, tracer.meter
    for _ in range(30):
        meter.sample_span(300_000)  # sustained: every timed span costs 300 us
    clock.now += 1.0
    sampler.maybe_adjust()
    assert sampler.overhead_factor == 0.5 and meter.span_samples == 0
    for _ in range(10):  # no span timed since: no decision on stale data, the factor recovers
        clock.now += 1.0
        sampler.maybe_adjust()
    assert sampler.overhead_factor == 1.0 and sampler.rate == 1.0
    meter.sample_span(300_000)  # fresh samples still over the budget: halved again
    clock.now += 1.0
    sampler.maybe_adjust()
    assert sampler.overhead_factor == 0.5


def _offer(tracer: Tracer, clock: FakeClock, start: float, seconds: float, traces_per_second: float,
           spans_per_trace: int = 4) -> list[int]:
    """Offer traces at a steady rate on the fake clock; the spans kept in each second."""
    kept_per_second = []
    per_second = int(traces_per_second)
    for second in range(int(seconds)):
        before = tracer.kept_spans
        for i in range(per_second):
            clock.now = start + second + i / per_second
            with tracer.start_as_current_span("root"):
                for _ in range(spans_per_trace - 1):
                    with tracer.start_as_current_span("child"):
                        pass
        kept_per_second.append(tracer.kept_spans - before)
    return kept_per_second


def test_the_first_second_of_a_process_or_a_load_step_keeps_about_twice_the_budget_at_most():
    # At rate 1.0 (a new process) and after a quiet spell, the rate changed only at the end of the first
    # second of load: it kept all of it (1,972-2,000 spans against a budget of 200). New roots are now
    # sampled only while the window's kept spans stay under twice its target.
    clock = FakeClock()
    tracer, _ = _tracer(200, clock)
    first = _offer(tracer, clock, 1000, 3, 500)  # 2,000 spans/s from the start
    assert first[0] <= 2 * 200 + 3, first  # the cap, plus the spans of the trace that crossed it
    assert all(n <= 2 * 200 + 3 for n in first), first
    quiet = _offer(tracer, clock, 1003, 10, 5)  # 20 spans/s: under budget, everything kept again
    assert tracer.sampler.rate == 1.0 and quiet[-1] == 20
    step = _offer(tracer, clock, 1013, 5, 500)  # a step to ten times the budget
    assert step[0] <= 2 * 200 + 3, step
    assert 100 <= sum(step[2:]) / 3 <= 300, step


def test_a_root_past_the_window_cap_is_unsampled_and_the_tail_rules_still_apply():
    clock = FakeClock()
    tracer, kept = _tracer(10, clock)  # cap: 20 spans a window
    sampler = tracer.sampler
    sampler.next_adjust = float("inf")  # one window throughout
    for _ in range(4):  # 4 traces of 5 spans: the window's 20
        with tracer.start_as_current_span("root"):
            for _ in range(4):
                with tracer.start_as_current_span("child"):
                    pass
    assert tracer.kept_spans == 20 and sampler.kept_total >= sampler.kept_limit
    with tracer.start_as_current_span("root.past.cap") as past:
        assert not past.is_recording()
    assert not sampler.should_sample(1)
    with pytest.raises(RuntimeError):  # a job past the cap is unsampled, and kept all the same when it fails
        with tracer.start_as_current_span("job.execution", attributes={"job.id": "j1"}) as job:
            assert not job._job.sampled
            with tracer.start_as_current_span("service.call"):
                raise RuntimeError("boom")
    assert [r[2][3] for r in kept[-2:]] == ["service.call", "job.execution"] and tracer.tail_kept_jobs == 1


def test_a_stalled_window_does_not_raise_the_rate():
    # A window stalled 10 s (SIGSTOP) read its offered load averaged over the stall, low, and doubled the rate.
    clock = FakeClock()
    tracer, _ = _tracer(200, clock)
    sampler = tracer.sampler
    _offer(tracer, clock, 1000, 5, 2000, spans_per_trace=1)  # ten times the budget
    for i in range(1000):  # half a window more, then the process is stopped for 10 s
        clock.now = 1005 + i / 2000
        tracer.start_span("x").end()
    rate = sampler.rate
    assert rate == pytest.approx(0.1, rel=0.3)
    clock.now = 1015.5  # resumed: the first span closes the stalled window
    tracer.start_span("x").end()
    assert sampler.offered_per_second < 200  # what the stalled window reads
    assert sampler.rate <= rate
    after = _offer(tracer, clock, 1015.5, 3, 2000, spans_per_trace=1)
    assert all(n <= 2 * 200 + 1 for n in after), after


def test_timed_samples_fall_on_every_place_of_a_job():
    # A fixed 1 in 32 fell on the same span of every 4-span job (32 is a multiple of 4): the job's first span,
    # touched cold after the worker's idle wait and many times dearer here, was never timed, and the estimated
    # CPU share read a third of the true one (so the budget never held the rate down at 100 jobs/s).
    import io

    from emp_machine.telemetry.logs import RecordWriter

    tracer, _ = _tracer(1e9, FakeClock())
    timed_places = set()
    for _ in range(2000):
        for place in range(4):
            span = tracer.start_span(f"step-{place}")
            if span._t0:
                timed_places.add(place)
            span.end()
    assert timed_places == {0, 1, 2, 3}

    timed_lines = set()

    class Noting(OverheadMeter):
        def sample_log(self, ns: int) -> None:
            timed_lines.add(line)

    writer = RecordWriter(lambda record: None, {}, stream=io.StringIO(), meter=Noting())
    for _ in range(2000):
        for line in range(8):  # a job's 8 lines: a fixed 1 in 32 timed only one place of them
            writer.write(9, "line %d", None, "t", args=(line,))  # (9: OTel's INFO severity)
    assert timed_lines == set(range(8))


def test_one_outlying_sample_moves_an_average_by_30_percent_at_most():
    # Samples are wall clock: one that took in another thread's turn (the writer's, whose CPU is measured on its
    # own) or a pause counted that too; at 10 jobs/s one such log sample took the estimate past the CPU budget
    # and cost traces. A sustained rise still moves the average (30 % a sample).
    meter = OverheadMeter()
    for _ in range(10):
        meter.sample_span(10_000)
        meter.sample_log(5_000)
    meter.sample_span(5_000_000)
    meter.sample_log(5_000_000)
    assert meter.span_ns == pytest.approx(0.9 * 10_000 + 0.1 * 40_000)
    assert meter.log_ns == pytest.approx(0.9 * 5_000 + 0.1 * 20_000)
    for _ in range(40):
        meter.sample_log(100_000)
    assert meter.log_ns > 90_000  # a real change is followed


def test_a_pause_in_the_first_sample_does_not_seed_the_average():
    # The first sample seeds the average whole: one with a pause in it (a GC, another thread's 5 ms turn) held
    # the rate at its floor for 30-40 s at 10 jobs/s, where every trace should be kept.
    meter = OverheadMeter()
    sampler = AdaptiveSampler(200, clock=FakeClock(), meter=meter, span_budget_us=100)
    meter.sample_span(5_000_000)
    meter.sample_log(5_000_000)
    assert sampler.meter.span_ns == 100_000 and meter.log_ns == 100_000

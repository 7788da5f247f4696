"""The shared tracer and its adaptive sampler: budget convergence, tail-keeping of failed and slow jobs,
parent decisions, exceptions, and log correlation."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

from emp_machine.telemetry import TelemetryConfig, bind, setup
from emp_machine.telemetry.buffer import Kind
from emp_machine.telemetry.sampling import AdaptiveSampler, OverheadMeter
from emp_machine.telemetry.tracing import Tracer
from otlp_receiver import attributes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tracer(budget: float, clock: FakeClock, meter: OverheadMeter | None = None, cpu_budget: float = float("inf"),
            span_budget_us: float = float("inf")):
    # The span-cost guard reads real time (a sampled span's perf counter): on a loaded machine one preempted
    # span read over 100 us and halved the rate under test. The CPU share does too (timed spans' cost per fake
    # second): one timed span preempted for ~50 ms put windows over a budget of 1.0 and the rate did not recover in
    # the test's 8 s (seen once in a full parallel run). Tests of other rules switch both off.
    kept: list[tuple] = []
    sampler = AdaptiveSampler(budget, clock=clock, meter=meter, cpu_budget=cpu_budget, span_budget_us=span_budget_us)
    return Tracer(sampler, kept.append, clock=clock), kept


@pytest.mark.parametrize("spans_per_trace", [1, 4])
def test_ten_times_the_budget_converges_to_the_budget(spans_per_trace):
    clock = FakeClock()
    tracer, kept = _tracer(200, clock)
    per_second = []
    for second in range(10):
        before = len(kept)
        for i in range(2000 // spans_per_trace):  # offered: 2000 spans/s, ten times the budget
            clock.now = 1000 + second + i / (2000 / spans_per_trace)
            with tracer.start_as_current_span("root"):
                for _ in range(spans_per_trace - 1):
                    with tracer.start_as_current_span("child"):
                        pass
        per_second.append(len(kept) - before)
    after_warmup = per_second[3:]
    assert 160 <= sum(after_warmup) / len(after_warmup) <= 240, per_second
    assert all(100 <= n <= 300 for n in after_warmup), per_second
    assert tracer.sampler.rate == pytest.approx(0.1, rel=0.3)


def test_spans_costlier_than_their_budget_halve_the_rate_and_cheap_ones_let_it_recover():
    clock = FakeClock()
    tracer, _ = _tracer(1e9, clock, span_budget_us=100)
    sampler = tracer.sampler
    for _ in range(3):
        sampler.meter.sample_span(250_000)  # timed spans cost 250 us each (under the 4x clamp of 400 us)
    clock.now += 1.0
    sampler.maybe_adjust()
    assert sampler.overhead_factor == 0.5 and sampler.rate == 0.5
    for _ in range(5):
        for _ in range(40):
            sampler.meter.sample_span(5_000)
        clock.now += 1.0
        sampler.maybe_adjust()
    assert sampler.overhead_factor == 1.0 and sampler.rate == 1.0


def test_rate_recovers_when_the_load_falls():
    clock = FakeClock()
    tracer, kept = _tracer(100, clock)
    for i in range(3000):
        clock.now = 1000 + i / 1000
        tracer.start_span("x").end()
    assert tracer.sampler.rate < 0.2
    for i in range(400):  # 50 spans/s for 8 s: under budget, everything is kept again
        clock.now = 1003 + i / 50
        tracer.start_span("x").end()
    assert tracer.sampler.rate == 1.0


def _metered_tracer():
    """A tracer whose telemetry threads' CPU is background[0] seconds (1 % CPU budget), and its clock."""
    clock = FakeClock()
    background = [0.0]
    tracer, _ = _tracer(10_000, clock, meter=OverheadMeter(lambda: background[0]), cpu_budget=0.01)
    return tracer, clock, background


def test_overhead_over_budget_lowers_the_rate():
    tracer, clock, background = _metered_tracer()
    for second in range(4):
        background[0] += 0.05  # telemetry's threads burn 5 % of a core: five times the budget
        clock.now = 1001 + second
        tracer.start_span("x").end()
    assert tracer.sampler.overhead_factor < 0.1
    assert tracer.sampler.rate < 0.1
    assert tracer.sampler.cpu_share == pytest.approx(0.05, rel=0.05)


def test_shedding_follows_the_overhead_control_both_ways():
    tracer, clock, background = _metered_tracer()
    assert not tracer.sampler.shedding
    for second in range(3):
        background[0] += 0.05
        clock.now = 1001 + second
        tracer.start_span("x").end()
    assert tracer.sampler.shedding
    second = 3
    while tracer.sampler.overhead_factor < 1.0 and second < 60:  # under budget again: it recovers
        clock.now = 1001 + second
        tracer.start_span("x").end()
        second += 1
    assert not tracer.sampler.shedding


def test_a_one_window_burst_under_budget_on_average_keeps_every_trace():
    # The shipper exports every few seconds: one window in five costs 3x the others, the average stays
    # under the budget, and the rate must not fall (issue 3: every trace kept at 10 jobs/s).
    tracer, clock, background = _metered_tracer()
    for second in range(20):
        background[0] += 0.016 if second % 5 == 4 else 0.005
        clock.now = 1001 + second
        tracer.start_span("x").end()
        assert tracer.sampler.rate == 1.0, second
    # A sustained overspend is still acted on within a few windows.
    for second in range(20, 26):
        background[0] += 0.03
        clock.now = 1001 + second
        tracer.start_span("x").end()
    assert tracer.sampler.rate < 0.5


def test_parent_decisions_are_followed():
    clock = FakeClock()
    tracer, kept = _tracer(1, clock)
    tracer.sampler.threshold = 0  # roots would never be sampled
    sampled = trace.set_span_in_context(NonRecordingSpan(SpanContext(7, 8, True, TraceFlags(1))))
    with tracer.start_as_current_span("call", sampled) as span:
        with tracer.start_as_current_span("inner"):
            pass
    assert span.is_recording() is False and len(kept) == 2
    assert {r[2][0] for r in kept} == {7} and kept[1][2][2] == 8  # same trace, parent is the remote span

    tracer.sampler.threshold = 1 << 56  # roots would always be sampled
    unsampled = trace.set_span_in_context(NonRecordingSpan(SpanContext(9, 10, True, TraceFlags(0))))
    with tracer.start_as_current_span("call", unsampled) as span:
        with tracer.start_as_current_span("inner") as inner:
            assert inner is span  # an unsampled child reuses its parent: nothing to record
    assert not span.is_recording() and span.get_span_context().trace_id == 9 and len(kept) == 2


def test_producer_ids_without_flags_are_sampled_within_the_budget():
    # The EMP API writes job_trace_id/job_span_id and no traceparent: those say nothing of sampling. Taken as
    # a sampled parent they kept every job's trace whatever the budget (an audit measured ~1430 spans/s kept
    # against a budget of 20); now the sampler decides from the trace id, as for a root.
    from emp_machine.telemetry.context import extract_job_context

    clock = FakeClock()
    tracer, kept = _tracer(200, clock)
    ids = random.Random(7)
    per_second = []
    for second in range(10):
        before = len(kept)
        for i in range(2000):  # ten times the budget, every span the child of a producer's ids
            clock.now = 1000 + second + i / 2000
            trace_id = ids.getrandbits(128) or 1
            incoming = extract_job_context({"job_trace_id": f"{trace_id:032x}", "job_span_id": f"{i + 1:016x}"})
            with tracer.start_as_current_span("call", incoming.context) as span:
                assert span.get_span_context().trace_id == trace_id  # the producer's trace goes on
        per_second.append(len(kept) - before)
    after_warmup = per_second[3:]
    assert 160 <= sum(after_warmup) / len(after_warmup) <= 240, per_second

    # The decision is the trace id's against the threshold: the same in every process for one trace.
    tracer.sampler.threshold = 1 << 55
    for trace_id, expected in ((1, True), ((1 << 55) - 1, True), (1 << 55, False), ((1 << 56) - 1, False)):
        incoming = extract_job_context({"job_trace_id": f"{trace_id:032x}", "job_span_id": "1" * 16})
        with tracer.start_as_current_span("call", incoming.context) as span:
            assert span.get_span_context().trace_flags.sampled is expected, trace_id


@pytest.mark.parametrize("fail", [True, False], ids=["failed-job", "ok-job"])
def test_a_span_ending_after_its_job_root_follows_the_jobs_decision(fail):
    # A task the job started and did not await ends after the job's root span. Its span used to be appended
    # to the job's already-emptied list: lost, and counted nowhere.
    clock = FakeClock()
    tracer, kept = _tracer(1, clock)
    tracer.sampler.threshold = 0  # unsampled: kept only if the job fails
    tracer.sampler.next_adjust = float("inf")
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with tracer.start_as_current_span("job.execution"):
            late = tracer.start_span("late.child")
            late_failed = tracer.start_span("late.failing")
            if fail:
                raise RuntimeError("boom")
    names = [r[2][3] for r in kept] if kept else []
    assert ("job.execution" in names) is fail
    dropped = tracer.dropped_spans
    late.end()
    late_failed.set_status(StatusCode.ERROR, "late failure")
    late_failed.end()
    late_names = [r[2][3] for r in kept[len(names):]]
    if fail:  # kept job: its late spans are written too
        assert late_names == ["late.child", "late.failing"]
    else:  # dropped job: the late span is counted as dropped; a failed one is kept all the same
        assert late_names == ["late.failing"] and tracer.dropped_spans == dropped + 1


@pytest.mark.parametrize("root_status, kept_whole", [(None, True), (StatusCode.OK, False)])
def test_a_failed_child_keeps_an_unsampled_jobs_trace_unless_the_root_says_ok(root_status, kept_whole):
    # A job whose service call failed while its root ended with no status is a failed job: its whole trace is
    # kept at any rate. An OK status set on the root is the job's own word that it did not fail (a job a drain
    # handed back, whose cancelled calls ended in error): dropped then, and counted (mutation audit M3).
    clock = FakeClock()
    tracer, kept = _tracer(1, clock)
    tracer.sampler.threshold = 0  # unsampled: kept only if the job fails (or is slow)
    tracer.sampler.next_adjust = float("inf")
    with tracer.start_as_current_span("job.execution") as root:
        with tracer.start_as_current_span("task.preprocessing"):
            pass
        with tracer.start_as_current_span("service.call") as call:
            call.set_status(StatusCode.ERROR, "the service said no")
        if root_status is not None:
            root.set_status(root_status)
    names = sorted(record[3] for _, _, record in kept)
    if kept_whole:
        assert names == ["job.execution", "service.call", "task.preprocessing"]
        assert tracer.tail_kept_jobs == 1 and tracer.dropped_spans == 0
    else:
        assert names == [] and tracer.tail_kept_jobs == 0 and tracer.dropped_spans == 3


def test_the_rate_at_most_doubles_a_second_when_the_load_falls():
    # From its floor the rate climbs back by doubling (the docstring's rule): a jump straight to 1.0 let the
    # next burst keep up to the window cap at once.
    clock = FakeClock()
    tracer, _ = _tracer(100, clock)
    for i in range(3000):  # 1000 spans/s for 3 s: ten times the budget
        clock.now = 1000 + i / 1000
        tracer.start_span("x").end()
    rates = [tracer.sampler.rate]
    assert rates[0] < 0.2
    for second in range(6):  # then 10 spans/s: far under the budget
        for i in range(10):
            clock.now = 1003 + second + i / 10
            tracer.start_span("x").end()
        rates.append(tracer.sampler.rate)
    assert rates[-1] == 1.0, rates
    assert all(later <= 2 * earlier + 1e-9 for earlier, later in zip(rates, rates[1:])), rates


def test_exceptions_keep_type_and_message_and_stacks_are_rate_limited():
    clock = FakeClock()
    tracer, kept = _tracer(1000, clock)
    for _ in range(5):
        with pytest.raises(KeyError):
            with tracer.start_as_current_span("x"):
                raise KeyError("missing")
    events = [r[2][10][0][2] for r in kept]
    assert all(e["exception.type"] == "KeyError" and "missing" in e["exception.message"] for e in events)
    assert sum("exception.stacktrace" in e for e in events) == 2  # the default 2 per second
    assert all(r[2][8] == 2 and r[2][9].startswith("KeyError") for r in kept)


def test_scope_options_and_spans_used_as_plain_api_spans():
    # start_as_current_span returns the span as its own context manager; start_span's span is not made
    # current by a with block (the API's behaviour), and a scope entered again later is a plain span.
    clock = FakeClock()
    tracer, kept = _tracer(1000, clock)
    before = trace.get_current_span()
    with tracer.start_span("plain") as plain:
        assert trace.get_current_span() is before
    assert not plain.is_recording() and [r[2][3] for r in kept] == ["plain"]
    with pytest.raises(ValueError):
        with tracer.start_as_current_span("quiet", record_exception=False, set_status_on_exception=False) as s:
            assert trace.get_current_span() is s
            raise ValueError("x")
    assert kept[-1][2][3] == "quiet" and kept[-1][2][8] == 0 and kept[-1][2][10] is None  # no status, no event
    with tracer.start_as_current_span("open", end_on_exit=False) as opened:
        pass
    assert trace.get_current_span() is before and opened.is_recording()
    with opened:  # entered again: not made current, ended on exit
        assert trace.get_current_span() is before
    assert not opened.is_recording() and kept[-1][2][3] == "open"
    tracer.sampler.threshold = 0  # the same for an unsampled root (its own scope too)
    with tracer.start_span("plain-unsampled") as plain:
        assert not plain.is_recording() and trace.get_current_span() is before
    with tracer.start_as_current_span("root") as root:
        assert trace.get_current_span() is root and not root.is_recording()
    assert trace.get_current_span() is before
    with root:  # entered again: a plain span
        assert trace.get_current_span() is before


def _telemetry(tmp_path, receiver, stream=None, **config):
    cfg = TelemetryConfig(otlp_endpoint=receiver.endpoint, export={"interval": "0.1s"}, **config)
    return setup(cfg, machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                 buffer_path=tmp_path / "t.db", stream=stream or io.StringIO())


def test_at_one_percent_a_failed_or_slow_job_still_arrives_whole(tmp_path, receiver):
    telemetry = _telemetry(tmp_path, receiver, sampling={"slow_job": "0.2s"})
    tracer = telemetry.tracer
    tracer.sampler.threshold = int(0.01 * (1 << 56))
    tracer.sampler.next_adjust = float("inf")  # hold the rate at 1 %
    log = telemetry.logger("test.jobs")

    def job(job_id: str, fail: bool = False, slow: bool = False) -> None:
        with telemetry.job_span(job_id, job_type="simulation") as root:
            if slow:
                root._start -= 300_000_000  # started 0.3 s earlier: slower than slow_job, without sleeping
            log.info("working on %s", job_id)
            for name in ("task.preprocessing", "service.call", "result.postprocessing"):
                with tracer.start_as_current_span(name):
                    if fail and name == "service.call":
                        raise RuntimeError("service exploded")

    for i in range(100):
        job(f"ok-{i}")
    # The two that must be tail-kept are certainly unsampled (at 1 % either one was sampled in ~2 % of
    # runs, and then counted as sampled, not tail-kept: a flake seen once in 25 runs).
    tracer.sampler.threshold = 0
    with pytest.raises(RuntimeError):
        job("failed-1", fail=True)
    job("slow-1", slow=True)
    telemetry.shutdown()
    spans = receiver.spans()
    by_job = {}
    for span in spans:
        by_job.setdefault(span.trace_id, []).append(span)
    failed = [s for group in by_job.values() for s in group
              if any(attributes(x.attributes).get("job.id") == "failed-1" for x in group)]
    names = sorted(s.name for s in failed)
    assert names == ["job.execution", "service.call", "task.preprocessing"]  # postprocessing never ran
    root = next(s for s in failed if s.name == "job.execution")
    assert root.status.code == 2 and attributes(root.events[0].attributes)["exception.type"] == "RuntimeError"
    assert all(s.trace_id == root.trace_id for s in failed)
    slow = [g for g in by_job.values() if any(attributes(x.attributes).get("job.id") == "slow-1" for x in g)]
    assert len(slow) == 1 and len(slow[0]) == 4
    # the failed job's deferred info log came along; most successful jobs' logs and spans did not
    assert any(r.body.string_value == "working on failed-1" for r in receiver.logs())
    ok_jobs = sum(1 for g in by_job.values() if any(str(attributes(x.attributes).get("job.id", "")).startswith("ok-")
                                                    for x in g))
    assert ok_jobs < 10
    assert telemetry.tracer.tail_kept_jobs == 2  # failed-1 and slow-1 (ok ones sampled at 1 % are not tail-kept)


def test_records_of_an_unsampled_job_that_ends_well_are_discarded_and_counted(tmp_path, receiver):
    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, receiver, stream=stream)
    tracer, log = telemetry.tracer, telemetry.logger("test.sampled_out")
    tracer.sampler.threshold = 0  # nothing sampled, and not over budget: the job holds its records
    tracer.sampler.next_adjust = float("inf")
    with telemetry.job_span("quiet-1", job_type="simulation"):
        log.info("step 1 of quiet-1")
        telemetry.events.emit("job.completed", job_id="quiet-1")
        log.warning("a warning is written at once")
    assert tracer.dropped_logs == 2 and telemetry.writer.deferred == 2
    assert "telemetry_logs_sampled_out_total 2" in telemetry.render_prometheus()
    telemetry.shutdown()
    assert [r.body.string_value for r in receiver.logs() if "quiet-1" in r.body.string_value
            or attributes(r.attributes).get("job_id") == "quiet-1"] == ["a warning is written at once"]


def test_over_budget_an_unsampled_job_sheds_its_info_records_but_not_its_trace(tmp_path, receiver):
    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, receiver, stream=stream)
    tracer, log = telemetry.tracer, telemetry.logger("test.lean")
    clog = telemetry.connector_logger("sim-0", "simulation")
    tracer.sampler.threshold = 0  # nothing sampled
    tracer.sampler.overhead_factor = 0.5  # and telemetry over its CPU budget
    tracer.sampler.next_adjust = float("inf")
    assert tracer.sampler.shedding

    def job(job_id: str, fail: bool) -> None:
        with telemetry.job_span(job_id, job_type="simulation") as root:
            assert root._job.lean
            clog.started(job_id)
            log.info("info of %s", job_id)
            with tracer.start_as_current_span("service.call") as child:
                assert child.is_recording() and trace.get_current_span() is child  # spans are still recorded
                log.warning("warning of %s", job_id)
                if fail:
                    raise RuntimeError("service exploded")
            clog.completed(job_id, 1.0)

    job("lean-ok", fail=False)
    with pytest.raises(RuntimeError):
        job("lean-failed", fail=True)
    assert telemetry.writer.shed == 5  # each job: job.started, one INFO log; the good one also job.completed
    assert "telemetry_logs_shed_total 5" in telemetry.render_prometheus()
    telemetry.shutdown()
    spans = receiver.spans()
    assert sorted(s.name for s in spans) == ["job.execution", "service.call"]  # the failed job's whole trace
    root = next(s for s in spans if s.name == "job.execution")
    child = next(s for s in spans if s.name == "service.call")
    assert attributes(root.attributes)["job.id"] == "lean-failed" and root.status.code == 2
    assert child.trace_id == root.trace_id and child.parent_span_id == root.span_id and child.status.code == 2
    assert attributes(root.events[0].attributes)["exception.type"] == "RuntimeError"
    bodies = sorted(r.body.string_value for r in receiver.logs())
    assert bodies == ["warning of lean-failed", "warning of lean-ok"]  # warnings are never shed
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {line["message"] for line in lines} == {"warning of lean-failed", "warning of lean-ok"}
    assert all(line["span_id"] == child.span_id.hex() for line in lines if line["job_id"] == "lean-failed")


def test_logs_carry_correlation_fields_and_redact(tmp_path, receiver):
    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, receiver, stream=stream)
    log = telemetry.logger("test.corr")
    with telemetry.job_span("job-42", job_hash={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}) as span:
        log.info("calling with Bearer abcdefghijklmnop", extra={"fields": {"password": "pw", "steps": 3}})
        try:
            raise ValueError("bad input")
        except ValueError:
            log.exception("job broke")
    log.debug("not at INFO")
    telemetry.shutdown()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first = lines[0]
    assert first["trace_id"] == "ab" * 16 and first["span_id"] == f"{span.get_span_context().span_id:016x}"
    assert (first["machine_id"], first["worker_id"], first["service_type"], first["job_id"]) == \
        ("m1", "m1-worker-0", "simulation", "job-42")
    assert first["password"] == "[REDACTED]" and "abcdefghijklmnop" not in first["message"]
    assert lines[1]["level"] == "error" and lines[1]["error.type"] == "ValueError"
    assert "Traceback" in lines[1]["error.stack"]
    assert not any(line["message"] == "not at INFO" for line in lines)
    logs = receiver.logs()
    assert {r.body.string_value for r in logs} >= {"job broke"}
    assert all("abcdefghijklmnop" not in str(r) for r in logs)


def test_bound_fields_and_kept_spans_are_redacted_before_they_leave_the_caller(tmp_path, receiver):
    """Secrets in fields bound with bind(), in span attributes, span events (an exception's message) and a
    status message reach neither stdout, nor the buffer, nor the collector."""
    secrets = ["sk-abcdefghijklmnop", "hunter22", "Bearer abcdefghijklmnopqrstuvwx", "supersecretvalue",
               "sk-zyxwvutsrqponmlk"]
    stream = io.StringIO()
    config = TelemetryConfig(otlp_endpoint=receiver.endpoint, export={"interval": "0.1s"},
                             sampling={"spans_per_second": 1e9})
    telemetry = setup(config, machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                      buffer_path=tmp_path / "t.db", stream=stream, start_shipper=False)  # the buffer is read first
    log = telemetry.logger("test.bound")
    with bind(api_key=secrets[0], endpoint=f"https://user:{secrets[1]}@example.com/v1"):
        log.info("hello")
        telemetry.events.emit("job.started", job_id="j1")
        with telemetry.tracer.start_as_current_span("call", attributes={"api_key": secrets[0]}) as span:
            span.set_attribute("url", f"https://user:{secrets[1]}@example.com/v1")
            span.add_event("request", {"authorization": secrets[2]})
            span.record_exception(ValueError(f"rejected token={secrets[3]}"))
            span.set_status(StatusCode.ERROR, f"failed with {secrets[4]}")
    telemetry.flush()
    buffered = [record for kind in (Kind.SPAN, Kind.LOG) for chunk in telemetry.buffer.read(kind, 100)
                for record in chunk.records]
    assert len(buffered) == 3  # the span and two log records
    telemetry.start_shipper()
    telemetry.shutdown()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["hello", "job.started"]
    assert all(line["api_key"] == "[REDACTED]" and line["endpoint"] == "https://user:[REDACTED]@example.com/v1"
               for line in lines)
    (exported,) = [s for s in receiver.spans() if s.name == "call"]
    assert attributes(exported.attributes)["api_key"] == "[REDACTED]"
    assert [e.name for e in exported.events] == ["request", "exception"]
    assert attributes(exported.events[1].attributes)["exception.message"] == "rejected token=[REDACTED]"
    assert len(receiver.logs()) == 2
    for text in (stream.getvalue(), repr(buffered), str(receiver.spans()), str(receiver.logs())):
        assert not any(secret in text for secret in secrets)


def test_logger_shortcuts_format_filter_and_take_keywords(tmp_path, receiver):
    # info/debug without keywords skip the stdlib layer; they must still format, filter by level and
    # honour a level change, and calls with keywords still go the full way.
    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, receiver, stream=stream)
    log = telemetry.logger("test.short")
    log.info("plain")
    log.info("job %s step %d", "j1", 3)
    log.info("%d%%", 50)
    log.debug("hidden %s", "x")
    log.setLevel(logging.DEBUG)
    log.debug("shown %s", "y")
    log.info("with %s", "extra", extra={"fields": {"steps": 2}})
    log.setLevel(logging.WARNING)
    log.info("filtered")
    telemetry.shutdown()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["level"], x["message"]) for x in lines] == [
        ("info", "plain"), ("info", "job j1 step 3"), ("info", "50%"), ("debug", "shown y"), ("info", "with extra")]
    assert lines[-1]["steps"] == 2 and all(x["logger"] == "test.short" for x in lines)


def test_one_tracer_per_process_through_the_provider(tmp_path, receiver):
    telemetry = _telemetry(tmp_path, receiver)
    try:
        assert telemetry.tracer_provider.get_tracer("a") is telemetry.tracer_provider.get_tracer("b")
        assert isinstance(telemetry.tracer, trace.Tracer)
        with telemetry.tracer.start_as_current_span("x") as span:
            assert trace.get_current_span() is span
            span.set_status(StatusCode.OK)
    finally:
        telemetry.shutdown()
    assert receiver.spans()[0].status.code == 1
    assert telemetry.buffer.pending() == 0


def test_fast_context_access_agrees_with_the_public_api():
    from opentelemetry import context as otel_context

    from emp_machine.telemetry.context import _SPAN_KEY, _Context, _get_current, _get_value, _reset, _set_current

    span = NonRecordingSpan(SpanContext(1, 2, False))
    token = otel_context.attach(otel_context.set_value("other", 5))
    try:
        inner = _set_current(_Context({**_get_current(), _SPAN_KEY: span}))  # how tracing attaches a span
        assert trace.get_current_span() is span and otel_context.get_value("other") == 5
        assert _get_value(_SPAN_KEY) is span and _get_value("other") == 5
        _reset(inner)
        assert trace.get_current_span() is not span and otel_context.get_value("other") == 5
    finally:
        otel_context.detach(token)
    with trace.use_span(span):
        assert _get_value(_SPAN_KEY) is span


def test_an_unsampled_root_is_current_for_its_block_and_restored_after_an_error():
    clock = FakeClock()
    tracer, kept = _tracer(100, clock)
    tracer.sampler.threshold = 0  # nothing sampled
    before = trace.get_current_span()
    with pytest.raises(RuntimeError):
        with tracer.start_as_current_span("root") as root:
            assert trace.get_current_span() is root and not root.is_recording()
            with tracer.start_as_current_span("child") as child:
                assert child is root  # children of an unsampled root reuse it
            raise RuntimeError("boom")
    assert trace.get_current_span() is before and kept == []


def test_records_of_a_task_outliving_its_job_follow_the_jobs_decision(tmp_path, receiver):
    # An unsampled job starts a task it does not await; the task logs after the job's root span ended. Its
    # span and INFO line reach the collector when the job was kept (it failed), and are shed and counted
    # when it was not, instead of vanishing into the job's emptied lists.
    telemetry = _telemetry(tmp_path, receiver)
    tracer, log = telemetry.tracer, telemetry.logger("test.late")
    tracer.sampler.threshold = 0
    tracer.sampler.next_adjust = float("inf")
    late = {}
    for job_id, fail in (("late-failed", True), ("late-ok", False)):
        with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
            with telemetry.job_span(job_id):
                late[job_id] = tracer.start_span(f"late.{job_id}")
                if fail:
                    raise RuntimeError("boom")
    shed = telemetry.writer.shed
    for job_id, span in late.items():
        with trace.use_span(span, end_on_exit=True):
            log.info("late info of %s", job_id)
    assert telemetry.writer.shed == shed + 1  # the dropped job's line, counted
    telemetry.shutdown()
    assert sorted(s.name for s in receiver.spans()) == ["job.execution", "late.late-failed"]
    assert [r.body.string_value for r in receiver.logs()] == ["late info of late-failed"]


def test_request_ids_sent_in_a_span_are_kept_on_it_up_to_a_bound():
    # An x-request-id sent to a service was recorded nowhere, so a service's log line quoting it led nowhere.
    from emp_machine.connectors._http import service_headers
    from emp_machine.telemetry.tracing import MAX_REQUEST_IDS

    clock = FakeClock()
    tracer, kept = _tracer(1e9, clock)

    class Job:
        id, headers = "job-1", {"x-job-id": "job-1"}

    service_headers(Job())  # no span: nothing to keep it on, and no error
    with tracer.start_as_current_span("service.call"):
        sent = [service_headers(Job())["x-request-id"] for _ in range(MAX_REQUEST_IDS + 5)]
        service_headers(Job(), "req-given")
    [(_, _, record)] = kept  # (kind, value, span record)
    assert record[7]["request_ids"] == sent[:MAX_REQUEST_IDS]
    assert len(set(sent)) == len(sent) and all(r.startswith("req-") for r in sent)


def test_a_failed_span_streamed_past_a_jobs_record_bound_is_an_error_record():
    # Past _MAX_JOB_RECORDS a job's spans are written as they end; a failed one went in as ROUTINE, so a full
    # buffer dropped it before info logs, metrics and events ("never error records while others remain").
    from emp_machine.telemetry.buffer import Value
    from emp_machine.telemetry.tracing import _MAX_JOB_RECORDS

    clock = FakeClock()
    tracer, kept = _tracer(1, clock)
    tracer.sampler.threshold = 0  # unsampled: the job holds its spans, up to the bound
    with tracer.start_as_current_span("job.execution"):
        for _ in range(_MAX_JOB_RECORDS + 2):
            with tracer.start_as_current_span("step"):
                pass
        failing = tracer.start_span("service.call")
        failing.set_status(StatusCode.ERROR, "boom")
        failing.end()
    [value] = [value for _, value, record in kept if record[3] == "service.call"]
    assert value == Value.ERROR


def test_past_its_record_bound_a_jobs_streamed_spans_are_counted_kept_by_the_sampler():
    # SamplerStats.kept_total missed every span streamed past _MAX_JOB_RECORDS (kept_spans counted them).
    from emp_machine.telemetry.tracing import _MAX_JOB_RECORDS

    clock = FakeClock()
    tracer, kept = _tracer(1, clock)
    tracer.sampler.threshold = 0
    tracer.sampler.next_adjust = float("inf")
    with tracer.start_as_current_span("job.execution"):
        for _ in range(_MAX_JOB_RECORDS + 50):
            with tracer.start_as_current_span("step"):
                pass
    assert len(kept) == _MAX_JOB_RECORDS + 51
    assert tracer.sampler.stats().kept_total == tracer.kept_spans == len(kept)


@pytest.mark.parametrize("fail", [True, False], ids=["failed-job", "ok-job"])
def test_an_unsampled_jobs_held_records_are_bounded_and_past_the_bound_the_job_arrives_whole(
        tmp_path, receiver, monkeypatch, fail):
    # One job logging 300 000 INFO lines held ~174 MB until its root ended (spans stopped at 10 000, records
    # never). Past _MAX_JOB_LOGS the job is kept whatever its outcome, as past _MAX_JOB_RECORDS: what it held
    # is written at once and every later record as it comes, so its trace and records still arrive whole.
    from emp_machine.telemetry import tracing

    default = getattr(tracing, "_MAX_JOB_LOGS", None)
    bound = 200  # lowered: the same rule, a faster test
    monkeypatch.setattr(tracing, "_MAX_JOB_LOGS", bound, raising=False)
    telemetry = _telemetry(tmp_path, receiver)
    tracer, log = telemetry.tracer, telemetry.logger("test.chatty")
    clog = telemetry.connector_logger("sim-0", "simulation")
    tracer.sampler.threshold = 0  # unsampled, not over budget: the job holds its INFO records
    tracer.sampler.next_adjust = float("inf")
    lines = 3 * bound
    held = []
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with telemetry.job_span("chatty", job_type="simulation") as root:
            clog.started("chatty")
            with tracer.start_as_current_span("service.call"):
                for n in range(lines):
                    log.info("line %d", n)
                    held.append(len(root._job.logs))
            clog.event("job.checkpoint", "chatty")
            if fail:
                raise RuntimeError("service exploded")
    assert max(held) < bound
    assert tracer.dropped_logs == 0 and tracer.tail_kept_jobs == 1
    telemetry.shutdown()
    bodies = [r.body.string_value for r in receiver.logs()]
    assert [b for b in bodies if b.startswith("line ")] == [f"line {n}" for n in range(lines)]
    assert "job.started" in bodies and "job.checkpoint" in bodies
    spans = receiver.spans()
    assert sorted(s.name for s in spans) == ["job.execution", "service.call"]
    [root_span] = [s for s in spans if s.name == "job.execution"]
    assert root_span.status.code == (2 if fail else 0)
    assert {r.trace_id for r in receiver.logs()} == {root_span.trace_id}
    assert default == 10_000  # the bound itself: the order of _MAX_JOB_RECORDS


def test_an_unsampled_child_with_an_explicit_context_never_ends_its_parents_scope():
    # A child started with context= under an unsampled (non-job) span got the shared parent back as its
    # context manager: its exit reset the parent's token. In the same task the parent was detached early;
    # from another task the reset failed and the parent stayed current for good: every later job of that
    # task joined its trace.
    import asyncio

    from opentelemetry import context as otel_context

    from emp_machine.telemetry.tracing import JOB_ROOT, current_ids

    clock = FakeClock()
    tracer, kept = _tracer(1e9, clock)
    tracer.sampler.threshold = 0  # unsampled roots
    tracer.sampler.next_adjust = float("inf")
    assert current_ids() == (0, 0)
    with tracer.start_as_current_span("connector.poll") as root:
        ids = current_ids()
        with tracer.start_as_current_span("child", context=otel_context.get_current()) as child:
            assert child is root and current_ids() == ids
        assert current_ids() == ids
        with tracer.start_span("plain") as plain:  # start_span's, in a with block: not made current
            assert current_ids() == ids and plain.get_span_context().trace_id == ids[0]
        assert current_ids() == ids
        other = tracer.start_span("other.root", context=otel_context.Context())
        with tracer.start_as_current_span("under.other", context=trace.set_span_in_context(other)) as under:
            assert under is other and current_ids()[0] == other.get_span_context().trace_id
        assert current_ids() == ids
    assert current_ids() == (0, 0)

    async def main():
        async def helper():
            with tracer.start_as_current_span("helper.child", context=otel_context.get_current()):
                await asyncio.sleep(0)

        with tracer.start_as_current_span("connector.poll") as poll:
            await asyncio.create_task(helper())
        assert current_ids() == (0, 0)

        async def job(n):
            with tracer.start_as_current_span(JOB_ROOT, attributes={"job.id": f"job-{n}"}) as span:
                return span._trace_id, span._parent_id

        jobs = await asyncio.gather(*(asyncio.create_task(job(n)) for n in range(3)))
        assert all(parent == 0 and trace_id != poll._trace_id for trace_id, parent in jobs)
        assert len({trace_id for trace_id, _ in jobs}) == 3

    asyncio.run(main())


def test_a_record_a_thread_holds_while_its_job_is_decided_is_not_lost(tmp_path, receiver):
    # A thread found its unsampled job undecided, then appended its record after the decision had written the
    # job's records out (or replaced the list): the record vanished from a failed job's trace. The thread is
    # held here between the check and the append (copying its fields) while the job fails.
    import collections.abc
    import contextvars
    import threading

    telemetry = _telemetry(tmp_path, receiver)
    tracer, log = telemetry.tracer, telemetry.logger("test.threads")
    tracer.sampler.threshold = 0
    tracer.sampler.next_adjust = float("inf")
    copying, go = threading.Event(), threading.Event()

    class SlowFields(collections.abc.Mapping):  # dict(fields) calls keys(): the thread waits there
        def __init__(self, tag):
            self._fields = {"tag": tag}

        def keys(self):
            copying.set()
            assert go.wait(10)
            return self._fields.keys()

        def __getitem__(self, key):
            return self._fields[key]

        def __iter__(self):
            return iter(self._fields)

        def __len__(self):
            return 1

    outcomes = {}
    for job_id, fail in (("threaded-failed", True), ("threaded-ok", False)):
        copying.clear()
        go.clear()
        dropped = tracer.dropped_logs
        with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
            with telemetry.job_span(job_id):
                thread = threading.Thread(target=contextvars.copy_context().run, args=(
                    lambda: log.info("from a thread of %s", job_id, extra={"fields": SlowFields(job_id)}),))
                thread.start()
                assert copying.wait(10)  # past the job's check, not yet held
                if fail:
                    raise RuntimeError("boom")
        go.set()
        thread.join(10)
        assert not thread.is_alive()
        outcomes[job_id] = tracer.dropped_logs - dropped
    assert outcomes == {"threaded-failed": 0, "threaded-ok": 1}  # the ok job's record: dropped and counted
    telemetry.shutdown()
    assert [r.body.string_value for r in receiver.logs()] == ["from a thread of threaded-failed"]


def test_a_span_a_thread_ends_while_its_job_is_decided_is_not_lost():
    # The same race for a span: ended in a thread after the job's check, added after the decision.
    import threading

    from emp_machine.telemetry.tracing import JOB_ROOT

    clock = FakeClock()
    tracer, kept = _tracer(1, clock)
    tracer.sampler.threshold = 0
    tracer.sampler.next_adjust = float("inf")
    appending, go = threading.Event(), threading.Event()

    class SlowList(list):  # the thread waits in append, past the job's check
        def append(self, item):
            if threading.current_thread() is not threading.main_thread():
                appending.set()
                assert go.wait(10)
            super().append(item)

    with pytest.raises(RuntimeError):
        with tracer.start_as_current_span(JOB_ROOT) as root:
            root._job.records = SlowList()
            in_thread = tracer.start_span("in.thread")
            thread = threading.Thread(target=in_thread.end)
            thread.start()
            assert appending.wait(10)
            raise RuntimeError("boom")
    go.set()
    thread.join(10)
    assert sorted(r[2][3] for r in kept) == ["in.thread", "job.execution"]


OTEL_PLUGIN = '''
"""A third-party connector instrumented the ordinary OTel way: tracers from `trace.get_tracer`, one taken
at import (a ProxyTracer until a provider is set) and one while the job runs."""
from opentelemetry import trace
from emp_machine.connectors.base import Connector, JobResult

_AT_IMPORT = trace.get_tracer(__name__)


class OtelLibConnector(Connector):
    name = "otellib"

    async def run(self, job, progress):
        with trace.get_tracer("some.instrumented.library").start_as_current_span("lib.call") as span:
            span.set_attribute("lib.job", job.id)
            with _AT_IMPORT.start_as_current_span("lib.inner"):
                pass
        return JobResult(data={"provider": type(trace.get_tracer_provider()).__name__})
'''


def test_a_connectors_otel_api_spans_arrive_in_its_jobs_trace_from_a_real_worker(tmp_path, receiver, redis_server,
                                                                                 monkeypatch):
    """`opentelemetry.trace.get_tracer(...)` inside a job is the worker's one tracer (installed as OTel's global
    provider at start-up), not the API's no-op ProxyTracer: its spans reach the collector in the job's trace."""
    import os
    import textwrap

    import redis as redis_lib

    from emp_machine.runtime.jobs import JobStore
    from _helpers import install_plugin
    from harness import WorkerProcs, wait_for

    site = tmp_path / "site"
    install_plugin(site, "emp_otel_plugin_", OTEL_PLUGIN, {"otellib": "OtelLibConnector"})
    monkeypatch.syspath_prepend(str(site))  # the manifest's connector check runs here too
    body = textwrap.dedent(f"""
    telemetry:
      otlp_endpoint: {receiver.endpoint}
      export: {{interval: 0.1s}}
    workers:
      lib:
        connector: otellib
        job_types: [otellib]
    """)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    procs = WorkerProcs(body, tmp_path / "w", redis_server.url, machine_id="otelapi",
                        environ={"PYTHONPATH": pythonpath})
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with procs.running(client, timeout=40):
            job_id = JobStore(client).submit("otellib", {}, max_retries=0)
            wait_for(lambda: client.hget(f"job:{job_id}", "status") in ("completed", "failed"), 20,
                     message=f"job {job_id} to end\n{procs.log(0)[-3000:]}")
            assert client.hget(f"job:{job_id}", "status") == "completed", procs.log(0)[-3000:]
            result = json.loads(client.hget("jobs:completed", job_id))["data"]

            def spans(name):
                return [s for s in receiver.spans() if s.name == name]

            wait_for(lambda: spans("lib.inner") and [s for s in spans("job.execution")
                                                     if attributes(s.attributes).get("job.id") == job_id],
                     20, message="the job's spans at the collector")
    finally:
        client.close()
    [execution] = [s for s in spans("job.execution") if attributes(s.attributes).get("job.id") == job_id]
    [call] = [s for s in spans("lib.call") if attributes(s.attributes).get("lib.job") == job_id]
    [inner] = spans("lib.inner")
    [service_call] = [s for s in spans("service.call") if s.parent_span_id == execution.span_id]
    assert call.trace_id == execution.trace_id and call.parent_span_id == service_call.span_id
    assert inner.trace_id == execution.trace_id and inner.parent_span_id == call.span_id
    assert result["data"]["provider"] == "TracerProvider"  # ours, where the API's ProxyTracerProvider was


MACHINE_PROBE = '''
"""Loaded by the machine process at start (sitecustomize): a library in that process using OTel's global API."""
import sys
import threading
import time

if "machine-run" in sys.argv:
    def _library():
        from opentelemetry import trace
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a library's span once the process's tracer is installed
            if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
                with trace.get_tracer("a.machine.library").start_as_current_span("machine.library.op"):
                    pass
                return
            time.sleep(0.05)

    threading.Thread(target=_library, daemon=True).start()
'''


def test_the_machine_process_installs_its_tracer_as_otels_global_one(tmp_path, receiver, machine_factory):
    import os

    from harness import wait_for

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MACHINE_PROBE)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    machine = machine_factory(f"""
    telemetry:
      otlp_endpoint: {receiver.endpoint}
      export: {{interval: 0.1s}}
    workers:
      sim:
        connector: simulation
        job_types: [machineotel]
        stop_grace: 5s
    """, env={"PYTHONPATH": pythonpath})
    machine.wait_ready(40)
    wait_for(lambda: [s for s in receiver.spans() if s.name == "machine.library.op"], 20,
             message="the machine process's library span at the collector")
    [span] = [s for s in receiver.spans() if s.name == "machine.library.op"]
    resources = [attributes(g.resource.attributes) for r in receiver.requests if r.path == "/v1/traces"
                 for g in r.request.resource_spans if any(s.name == span.name for ss in g.scope_spans for s in ss.spans)]
    assert [a["service.type"] for a in resources] == ["machine"]


KILLED_JOB = '''
import io, sys, time
from pathlib import Path
from emp_machine.telemetry import TelemetryConfig, setup
buffer_path, endpoint, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = TelemetryConfig(otlp_endpoint=endpoint, sampling={"spans_per_second": 1e9},
                         export={"interval": "0.1s", "max_backoff": "0.3s"})
telemetry = setup(config, machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                  buffer_path=buffer_path, stream=io.StringIO())
if mode == "job":
    tracer = telemetry.tracer
    with telemetry.job_span("killed-job", job_type="simulation") as root:
        assert root._job.sampled  # rate 1.0
        for name in ("task.preprocessing", "service.call", "service.call"):
            with tracer.start_as_current_span(name):
                pass
        assert telemetry.flush()  # whatever was queued is committed: a SIGKILL loses none of it
        print("in the long step", flush=True)
        with tracer.start_as_current_span("result.postprocessing"):
            time.sleep(60)  # waits for the SIGKILL
else:  # the restarted worker: ships what the killed one left in the buffer
    deadline = time.monotonic() + 30
    while telemetry.buffer.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("drained" if not telemetry.buffer.pending() else "not drained", flush=True)
    telemetry.shutdown(timeout=2)
'''


def test_a_sampled_jobs_ended_spans_survive_a_sigkill_mid_job(tmp_path):
    # A sampled job held its ended child spans in memory until its root ended: a worker SIGKILLed mid-job (OOM,
    # segfault) lost every span of the job, including ones that ended seconds before. They are now written
    # as they end, so a kill loses at most what the buffer had not committed.
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from otlp_receiver import OtlpReceiver, free_port

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    receiver = OtlpReceiver(free_port())  # not listening until the restart: nothing leaves the first process

    def start(mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(tmp_path / "worker.db"), receiver.endpoint,
                                 mode], stdout=subprocess.PIPE, text=True, env=env)

    worker = start("job")
    restarted = None
    try:
        assert worker.stdout.readline().strip() == "in the long step"
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(10) == -signal.SIGKILL
        receiver.start()
        restarted = start("restart")
        assert restarted.stdout.readline().strip() == "drained"
        assert restarted.wait(20) == 0
    finally:
        for proc in (worker, restarted):
            if proc is not None and proc.poll() is None:
                proc.kill()
        receiver.stop()
    spans = receiver.spans()
    assert sorted(s.name for s in spans) == ["service.call", "service.call", "task.preprocessing"]
    assert len({s.trace_id for s in spans}) == 1


def test_span_attributes_and_events_are_bounded_as_the_sdk_bounds_them():
    # 300,000 add_event calls on one span held 215 MiB and went out as one 16 MB request. Now: 128 events a
    # span (the oldest go: an escaping exception, recorded last, stays), 128 attributes a span (new keys past
    # them dropped, existing ones still updated) and 128 an event; what is dropped is counted and exported.
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from emp_machine.telemetry.encode import encode_span
    from emp_machine.telemetry.tracing import MAX_EVENT_ATTRIBUTES, MAX_SPAN_ATTRIBUTES, MAX_SPAN_EVENTS

    assert MAX_SPAN_ATTRIBUTES == MAX_SPAN_EVENTS == MAX_EVENT_ATTRIBUTES == 128  # the OTel SDK's defaults
    clock = FakeClock()
    tracer, kept = _tracer(1e9, clock)
    with pytest.raises(RuntimeError):
        with tracer.start_as_current_span("service.call", attributes={"job.id": "j1"}) as span:
            for i in range(1000):
                span.add_event("progress", {"step": i})
                assert len(span._events) <= 128  # bounded while the span runs, not only when written
            for i in range(200):
                span.set_attribute(f"a{i}", i)
            span.set_attribute("job.id", "j1-updated")  # an existing key: still updated past the bound
            span.set_attributes({f"b{i}": i for i in range(10)})
            span.add_event("wide", {f"k{i}": i for i in range(130)})
            raise RuntimeError("boom")
    [(_, _, record)] = kept
    decoded = Span.FromString(encode_span(record))
    names = [e.name for e in decoded.events]
    assert len(names) == 128 and names[-2:] == ["wide", "exception"]  # the newest kept, the exception last
    assert attributes(decoded.events[0].attributes) == {"step": 874}
    assert decoded.dropped_events_count == 1002 - 128
    assert len(decoded.attributes) == 128 and decoded.dropped_attributes_count == 200 - 127 + 10
    kept_attributes = attributes(decoded.attributes)
    assert kept_attributes["job.id"] == "j1-updated" and "a126" in kept_attributes and "a127" not in kept_attributes
    wide = decoded.events[-2]
    assert len(wide.attributes) == 128 and wide.dropped_attributes_count == 2
    assert attributes(wide.attributes)["k0"] == 0 and "k129" not in attributes(wide.attributes)

    # Attributes given at the start count too; a span within the bounds writes the plain 13-field record.
    with tracer.start_as_current_span("wide.start", attributes={f"c{i}": i for i in range(300)}):
        pass
    decoded = Span.FromString(encode_span(kept[-1][2]))
    assert len(decoded.attributes) == 128 and decoded.dropped_attributes_count == 172
    with tracer.start_as_current_span("plain") as plain:
        plain.add_event("one", {"x": 1})
    assert len(kept[-1][2]) == 13 and Span.FromString(encode_span(kept[-1][2])).dropped_events_count == 0

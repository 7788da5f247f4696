"""One light, OpenTelemetry-API tracer per process, in front of the durable buffer.

Spans implement `opentelemetry.trace.Span` and live in OTel's context, so OTel instrumentation and
`trace.get_current_span()` see them, but a recorded span is a handful of slots turned into one tuple at
`end()` and appended to the buffer's queue: no SDK processor, no export queue to overflow.

Decisions:
- a sampled parent (remote or local) is followed; an unsampled one too, except that a job keeps its spans;
- a root asks the `AdaptiveSampler` (trace-id based);
- a job (a span named `job.execution`, or the root carrying `job.id`) always records its spans cheaply; a
  sampled one writes each as it ends (a SIGKILL mid-job loses only what the buffer had not made durable), an
  unsampled one holds them and decides when its root span ends: kept when failed (error status) or slower
  than `slow_job`, otherwise its spans (and deferred log records) are discarded and counted as dropped by
  sampling (a SIGKILL mid-job loses what it held);
- any other unsampled span is a `NonRecordingSpan`; its unsampled children reuse it (no new ids, no context
  switch), which is what makes an unsampled span cost about a microsecond. A child started with an explicit
  `context=` gets a scope of its own (`_Attach`), never the shared parent's enter/exit.

Exceptions are recorded with type and message always, and with the formatted stack for at most
`stacks_per_second` a second (formatting a traceback costs ~150 us).

Limits, the OTel SDK's defaults: 128 attributes a span (a new key past them is dropped, an existing one is
still updated), 128 events a span (past them the oldest goes, so an escaping exception, recorded last, stays)
and 128 attributes an event (the first kept). What is dropped is counted and exported as the span's
`dropped_attributes_count`/`dropped_events_count` and the event's `dropped_attributes_count`: 300,000
events on one span held 215 MiB and went out as one 16 MB request.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import INVALID_SPAN

from emp_machine.telemetry.buffer import Kind, Value
from emp_machine.telemetry.context import (_SPAN_KEY, UNDECIDED, _Context, _get_current, _get_value, _reset,
                                           _set_current, make_span_context)
from emp_machine.telemetry.redact import redact_fields, redact_text
from emp_machine.telemetry.sampling import AdaptiveSampler, next_timed_gap

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_getrandbits = random.getrandbits
_time_ns = time.time_ns
_monotonic_ns = time.monotonic_ns
_perf_ns = time.perf_counter_ns
_new = object.__new__

JOB_ROOT = "job.execution"
# OTLP span kinds are the API's + 1 (0 is UNSPECIFIED).
_OTLP_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4,
              SpanKind.CONSUMER: 5}
_STATUS = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}
# start_as_current_span's options, kept on the span (LightSpan._scope)
_CURRENT, _RECORD_EXCEPTION, _SET_STATUS, _END_ON_EXIT = 1, 2, 4, 8
_DEFAULT_SCOPE = _CURRENT | _RECORD_EXCEPTION | _SET_STATUS | _END_ON_EXIT
_MAX_JOB_RECORDS = 10_000  # a job holding more streams the rest as it goes (decided as if sampled)
# Log records and events an unsampled job holds: past it the job is kept whatever its outcome, as past
# _MAX_JOB_RECORDS (what it held is written at once, later ones as they come): see JobTrace.hold.
_MAX_JOB_LOGS = 10_000
# Per span, as the OTel SDK's defaults (OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_SPAN_EVENT_COUNT_LIMIT,
# OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT); what is dropped is counted in LightSpan._dropped (see the docstring).
MAX_SPAN_ATTRIBUTES = 128
MAX_SPAN_EVENTS = 128
MAX_EVENT_ATTRIBUTES = 128
# Serialises whoever takes what a job holds (its decision, a thread that added to it while it was decided, a
# log overflow), so that no two take the same item; adding takes no lock (list.append is atomic).
_TAKE_LOCK = threading.Lock()
# Span times: a live span's start, end and event times are time.monotonic_ns() readings, turned into wall time
# (Unix ns) only when the span is written (`LightSpan.record`), by adding this process's anchor, wall minus
# monotonic, as the OTel Java/JS SDKs anchor theirs: a wall-clock step (an NTP correction, a clock set by
# hand) in the middle of a job can no longer give a span a negative duration (-3,589,933 ms was seen), nor
# make the slow-job rule read one. The anchor is taken again once a sampler window (`_reanchor`, ~1 s), so the
# written times follow a corrected wall clock within a second; a span's start and end are always written with
# the same anchor, so its duration is exact. Explicit `start_time`/`end_time`/`timestamp` arguments (wall ns, by
# the API) are turned into this clock with the current anchor.
# A change of the anchor under 50 ms is no step (real ones are seconds or more) but the error of a reading: a
# thread preempted under load between the two clocks' readings (tens of ms); kept, so that a parent and a child
# span are not written under anchors that differ by it (the child outside its parent).
_REANCHOR_NS = 50_000_000


def _read_anchor() -> int:
    """Wall minus monotonic, from the tightest of 3 readings of the wall clock between two of the monotonic one
    (anchored to the bracket's midpoint): a reading a preempted thread held up is not the one used."""
    best_width = best = None
    for _ in range(3):
        before = _monotonic_ns()
        wall = _time_ns()
        after = _monotonic_ns()
        if best_width is None or after - before < best_width:
            best_width, best = after - before, wall - (before + after) // 2
    return best


_wall_anchor_ns = _read_anchor()


def _reanchor() -> None:
    """Take the anchor again (off the hot path: once a sampler window), when the wall clock moved against
    the monotonic clock (a step) by more than _REANCHOR_NS."""
    global _wall_anchor_ns
    anchor = _read_anchor()
    if abs(anchor - _wall_anchor_ns) > _REANCHOR_NS:
        _wall_anchor_ns = anchor


def _to_monotonic(wall_ns: int) -> int:
    """An explicit wall time (Unix ns, as the API's start_time/end_time/timestamp) on the spans' clock."""
    return wall_ns - _wall_anchor_ns
_take_lock, _take_unlock = _TAKE_LOCK.acquire, _TAKE_LOCK.release  # (cheaper than a with block)


def _take(held: list) -> list:
    """Everything in `held`, removed. An item appended meanwhile (by a thread, without the lock) lands after
    the copied ones and stays for the next taker."""
    _take_lock()
    try:
        taken = held[:]
        del held[:len(taken)]
    finally:
        _take_unlock()
    return taken


class _Unsampled(NonRecordingSpan):
    """Our own non-recording span: its children reuse it instead of creating spans. Its SpanContext is built
    only when asked for (propagation, a log line): validating one costs ~0.8 us. Made by Tracer._start
    without an __init__ call (object.__new__, then _trace_id, _span_id, _state, _context = None and _token =
    None); start_as_current_span sets _scope and returns it as its own context manager (current for the
    block; there is nothing to record or end). Only the call that made it does: a child that reuses it gets
    `_Reuse` or `_Attach`, and start_span a copy, never this object's enter/exit."""

    __slots__ = ("_trace_id", "_span_id", "_state", "_scope", "_token")

    def __enter__(self) -> "_Unsampled":
        if self._scope and self._token is None:  # start_span()'s is not made current, as the API's is not
            self._token = _set_current(_Context({**_get_current(), _SPAN_KEY: self}))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        token = self._token
        if token is not None:
            self._token = None
            self._scope = False  # entered again later, it is a plain API span
            try:
                _reset(token)
            except ValueError:  # a token from another context (generators, tasks): what OTel's detach logs
                pass

    def get_span_context(self) -> SpanContext:
        if self._context is None:
            self._context = make_span_context(self._trace_id, self._span_id, False, _NOT_SAMPLED, self._state)
        return self._context


class JobTrace:
    """The spans and deferred log records of one job, held until its root span ends unless it is sampled (its
    spans are then written as they end; a sampled job holds no log records either)."""

    __slots__ = ("sampled", "records", "logs", "failed", "overflow", "lean", "decided", "tracer")

    def __init__(self, sampled: bool, lean: bool, tracer: "Tracer"):
        self.sampled = sampled
        self.tracer = tracer
        # Set when the root span ends, after `sampled` and `lean`. A span or record that ends later (a task
        # the job started and did not await) follows the decision: written at once when the job was kept
        # (`sampled` is then set), shed and counted when it was not (`lean` is then set). One a thread adds
        # while the job is decided is taken by the decision or, added after it, by that thread (`hold`).
        self.decided = False
        self.records: list[LightSpan] = []  # ended spans of an unsampled job; records only if it is kept
        self.logs: list[tuple] = []   # (write, args) of log records deferred by logs.RecordWriter
        self.failed = False
        self.overflow = False
        # Unsampled while telemetry is over its CPU budget (AdaptiveSampler.shedding): the job still records
        # all its spans (a failed or slow job's trace is always exported) and its warnings and errors, but
        # not its DEBUG/INFO records and events.
        self.lean = lean

    def hold(self, write: Callable, args: tuple) -> None:
        """Hold a log record or event of this job until it is decided: `write(*args)` writes it if the job is
        kept (logs.RecordWriter and joblog.ConnectorLogger call this once they found the job unsampled and not
        lean). At most _MAX_JOB_LOGS are held: the job is then kept whatever its outcome (as past
        _MAX_JOB_RECORDS spans), what it held is written now and each later record as it comes, so a failed
        job's records still arrive whole. Added while another thread decided the job, it follows the
        decision."""
        logs = self.logs
        logs.append((write, args))
        if self.decided or self.overflow or len(logs) >= _MAX_JOB_LOGS:
            self.tracer._release_logs(self)


class LightSpan(otel_trace.Span):
    __slots__ = ("_tracer", "_trace_id", "_span_id", "_parent_id", "_flags", "_state", "_context", "name",
                 "_kind", "_start", "_end", "_attributes", "_events", "_status", "_status_message", "_job",
                 "_is_job_root", "_t0", "_remote_parent", "_scope", "_token", "_dropped")

    def __init__(self, tracer: "Tracer", trace_id: int, parent_id: int, flags: TraceFlags, state: Any,
                 name: str, kind: SpanKind, attributes: Mapping | None, start: int | None, job: JobTrace | None,
                 is_job_root: bool, remote_parent: bool):
        self._tracer = tracer
        self._trace_id = trace_id
        self._span_id = _getrandbits(64) or 1
        self._parent_id = parent_id
        self._flags = flags
        self._state = state
        self._context: SpanContext | None = None
        self.name = name
        self._kind = kind
        self._start = _to_monotonic(start) if start else _monotonic_ns()
        self._end = 0
        self._events: list | None = None
        self._dropped: list | None = None  # [attributes, events] dropped past the limits, once any was
        if attributes:
            self._attributes = copied = dict(attributes)
            if len(copied) > MAX_SPAN_ATTRIBUTES:
                self._cap_attributes()
        else:
            self._attributes = {}
        self._status = 0
        self._status_message = ""
        self._job = job
        self._is_job_root = is_job_root
        self._t0 = 0
        self._remote_parent = remote_parent
        self._scope = 0  # start_as_current_span's options (_CURRENT | ...): the span is its own scope
        self._token = None

    # --- OTel Span API -------------------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        if self._context is None:  # built on demand: most spans never need one
            self._context = make_span_context(self._trace_id, self._span_id, False, self._flags, self._state)
        return self._context

    def is_recording(self) -> bool:
        return self._end == 0

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end == 0:
            attributes = self._attributes
            if len(attributes) < MAX_SPAN_ATTRIBUTES or key in attributes:
                attributes[key] = value
            else:
                self._count_dropped(0, 1)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self._end == 0:
            self._attributes.update(attributes)
            if len(self._attributes) > MAX_SPAN_ATTRIBUTES:
                self._cap_attributes()

    def _cap_attributes(self) -> None:
        """Keep the first MAX_SPAN_ATTRIBUTES keys (those set at the start: job.id, service.type), count the
        rest dropped."""
        attributes = self._attributes
        over = len(attributes) - MAX_SPAN_ATTRIBUTES
        for key in list(attributes)[MAX_SPAN_ATTRIBUTES:]:
            del attributes[key]
        self._count_dropped(0, over)

    def _count_dropped(self, index: int, count: int) -> None:
        """Count `count` attributes (index 0) or events (1) dropped; from the first, events' tuples may carry a
        4th item (their own dropped attributes), which record() then reads."""
        dropped = self._dropped
        if dropped is None:
            self._dropped = dropped = [0, 0]
        dropped[index] += count

    def add_event(self, name: str, attributes: Mapping | None = None, timestamp: int | None = None) -> None:
        if self._end:
            return
        events = self._events
        if events is None:
            self._events = events = []
        elif len(events) >= MAX_SPAN_EVENTS:  # the oldest goes: an escaping exception is recorded last
            del events[0]
            self._count_dropped(1, 1)
        at = _to_monotonic(timestamp) if timestamp else _monotonic_ns()
        if not attributes:
            events.append((at, name, {}))
        elif len(attributes) <= MAX_EVENT_ATTRIBUTES:
            events.append((at, name, dict(attributes)))
        else:  # the first MAX_EVENT_ATTRIBUTES kept (an exception's own come first); the event counts the rest
            kept = dict(list(attributes.items())[:MAX_EVENT_ATTRIBUTES])
            self._count_dropped(0, 0)  # (none of the span's own: marks the span for _record_past_limits)
            events.append((at, name, kept, len(attributes) - MAX_EVENT_ATTRIBUTES))

    def add_link(self, context: SpanContext, attributes: Mapping | None = None) -> None:
        pass  # links are not recorded (nothing in emp-machine creates them); see docs/telemetry.md

    def update_name(self, name: str) -> None:
        if self._end == 0:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end:
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if code is StatusCode.UNSET or self._status == 1:  # OK is final, per the API
            return
        self._status = _STATUS[code]
        self._status_message = (description or "") if code is StatusCode.ERROR else ""

    def record_exception(self, exception: BaseException, attributes: Mapping | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        event = {"exception.type": type(exception).__qualname__, "exception.message": str(exception)[:2000]}
        if self._tracer._stack_allowed():
            event["exception.stacktrace"] = "".join(
                traceback.format_exception(type(exception), exception, exception.__traceback__))
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end:
            return
        timed = self._t0
        if timed:
            t_end = _perf_ns()
        self._end = _to_monotonic(end_time) if end_time else _monotonic_ns()
        self._tracer._finish(self)
        if timed:
            self._tracer.meter.sample_span(self._t0 + _perf_ns() - t_end)

    # --- as start_as_current_span's context manager (saves a scope object a span) ----------------------

    def __enter__(self) -> "LightSpan":
        if self._scope and self._token is None:  # attach; a span from start_span() is not made current
            if self._t0:  # a timed span: its attach is telemetry's cost too (the sample is taken at its end)
                t = _perf_ns()
                self._token = _set_current(_Context({**_get_current(), _SPAN_KEY: self}))
                self._t0 += _perf_ns() - t
            else:
                self._token = _set_current(_Context({**_get_current(), _SPAN_KEY: self}))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        token = self._token
        if token is None:  # start_span()'s span in a with block: ended, as the API's Span does
            self.end()
            return
        self._token = None
        scope, self._scope = self._scope, 0  # entered again later, it is a plain API span
        try:
            if exc is not None and self._end == 0:
                if scope & _RECORD_EXCEPTION and not isinstance(exc, GeneratorExit):
                    self.record_exception(exc, escaped=True)
                if scope & _SET_STATUS:
                    self.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            if scope & _END_ON_EXIT:
                self.end()
        finally:
            try:
                _reset(token)
            except ValueError:  # a token from another context (generators, tasks): what OTel's detach logs
                pass

    def __repr__(self) -> str:
        return f"LightSpan({self.name!r}, trace_id={self._trace_id:032x}, span_id={self._span_id:016x})"

    def record(self) -> tuple:
        """The span as the buffer keeps it (encode.py's layout). Attributes, events' attributes (an
        exception's message and stack) and the status message are redacted here, when the span is kept:
        spans that are dropped never pay for it."""
        flags = 0x100 | (0x200 if self._remote_parent else 0) | (1 if self._flags & 1 else 0)
        events = self._events
        anchor = _wall_anchor_ns  # monotonic -> wall, one anchor for all of the span's times
        dropped = self._dropped
        if dropped is not None:
            return self._record_past_limits(flags, anchor)
        return (self._trace_id, self._span_id, self._parent_id, self.name, _OTLP_KIND[self._kind],
                self._start + anchor, self._end + anchor,
                redact_fields(self._attributes) if self._attributes else self._attributes, self._status,
                redact_text(self._status_message) if self._status_message else "",
                tuple((at + anchor, name, redact_fields(attributes) if attributes else attributes)
                      for at, name, attributes in events) if events else None,
                self._state.to_header() if self._state else "", flags)

    def _record_past_limits(self, flags: int, anchor: int) -> tuple:
        """record() of a span that dropped something past the limits: its events may carry their own dropped
        count (a 4th item) and the record two more fields, dropped attributes and dropped events (encode.py)."""
        events = self._events
        return (self._trace_id, self._span_id, self._parent_id, self.name, _OTLP_KIND[self._kind],
                self._start + anchor, self._end + anchor,
                redact_fields(self._attributes) if self._attributes else self._attributes, self._status,
                redact_text(self._status_message) if self._status_message else "",
                tuple((event[0] + anchor, event[1], redact_fields(event[2]) if event[2] else event[2]) + event[3:]
                      for event in events) if events else None,
                self._state.to_header() if self._state else "", flags, self._dropped[0], self._dropped[1])


class _Reuse:
    """The scope of an unsampled child: its parent stays current; nothing to do."""

    __slots__ = ("_span",)

    def __init__(self, span):
        self._span = span

    def __enter__(self):
        return self._span

    def __exit__(self, exc_type, exc, tb) -> None:
        return None


class _Attach:
    """The scope of an unsampled child started with an explicit `context=`: its parent stands in for it and is
    made current for the block with this scope's own token (not at all when it is current already). Entering
    the shared parent itself would reset the parent's token at the child's exit: the parent was detached
    early, and from another task (the reset fails there) it stayed current for good, so every later job of
    that task joined its trace."""

    __slots__ = ("_span", "_token")

    def __init__(self, span):
        self._span = span
        self._token = None

    def __enter__(self):
        current = _get_current()
        if current.get(_SPAN_KEY) is not self._span:
            self._token = _set_current(_Context({**current, _SPAN_KEY: self._span}))
        return self._span

    def __exit__(self, exc_type, exc, tb) -> None:
        token = self._token
        if token is not None:
            self._token = None
            try:
                _reset(token)
            except ValueError:  # a token from another context (generators, tasks): what OTel's detach logs
                pass


class Tracer(otel_trace.Tracer):
    """The process's tracer. Get it from `Telemetry.tracer` (or the provider); never build another."""

    def __init__(self, sampler: AdaptiveSampler, emit: Callable[[int, int, tuple], None], *,
                 slow_job_s: float = 30.0, stacks_per_second: float = 2.0, base_attributes: Mapping | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.sampler = sampler
        self.meter = sampler.meter
        self._emit = emit  # buffer queue append of (kind, value, record)
        self._slow_ns = int(slow_job_s * 1e9)
        self._stack_rate = stacks_per_second
        self._stack_tokens = stacks_per_second
        self._stack_time = clock()
        self._clock = clock
        # The span times' anchor is taken again at every sampler window, whoever adjusts it (this tracer, or the
        # housekeeping thread's maybe_adjust when no span ends): off the hot path, nothing added to a span.
        adjust = sampler.adjust

        def adjust_and_reanchor(now: float) -> None:
            adjust(now)
            _reanchor()

        sampler.adjust = adjust_and_reanchor
        self._n = 32  # spans until the first timed one (then at random gaps)
        self.base_attributes = dict(base_attributes or {})
        self.kept_spans = 0          # spans written to the buffer
        self.dropped_spans = 0       # spans discarded by sampling (jobs that were neither failed nor slow)
        self.tail_kept_jobs = 0      # unsampled jobs kept because they failed or were slow
        self.dropped_logs = 0        # log records and events held by such jobs and discarded with them

    # --- creation ------------------------------------------------------------------------------------

    def start_span(self, name: str, context: otel_context.Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Mapping | None = None, links: Sequence | None = None, start_time: int | None = None,
                   record_exception: bool = True, set_status_on_exception: bool = True) -> otel_trace.Span:
        span, reused = self._start(name, context, kind, attributes, start_time)
        if reused:  # a copy: a `with` on the shared parent itself would end the parent's own scope
            parent, span = span, _new(_Unsampled)
            span._trace_id, span._span_id, span._state = parent._trace_id, parent._span_id, parent._state
            span._context, span._token, span._scope = parent._context, None, False
        return span

    def _start(self, name: str, context: otel_context.Context | None, kind: SpanKind, attributes: Mapping | None,
               start_time: int | None) -> tuple[otel_trace.Span, bool]:
        """(span, reused): reused when an unsampled parent stands in for its child."""
        self._n -= 1
        timed = not self._n  # 1 in 32 at random gaps (sampling.next_timed_gap)
        if timed:
            self._n = next_timed_gap()
            t0 = _perf_ns()
        sampler = self.sampler
        sampler.offered += 1
        parent = (_get_current() if context is None else context).get(_SPAN_KEY)
        parent_type = type(parent)
        if parent_type is _Unsampled and name != JOB_ROOT:
            sampler.dropped_total += 1
            return parent, True
        if parent_type is LightSpan and name != JOB_ROOT:  # a local child: same trace, same job
            job = parent._job
            span = LightSpan(self, parent._trace_id, parent._span_id, parent._flags, parent._state, name, kind,
                             attributes, start_time, job, False, False)
        else:
            is_job = name == JOB_ROOT or (attributes is not None and "job.id" in attributes)
            parent_context = parent.get_span_context() if parent is not None else None
            if parent_context is not None and parent_context.is_valid:
                trace_id = parent_context.trace_id
                if parent_context.trace_flags is UNDECIDED:  # a producer's ids without flags: decided here
                    if self._clock() >= sampler.next_adjust:
                        sampler.adjust(self._clock())
                    sampled = (trace_id & 0xFFFFFFFFFFFFFF) < sampler.threshold
                    if sampled and sampler.kept_total >= sampler.kept_limit:  # this window's spans are spent
                        sampled = False
                else:
                    sampled = parent_context.trace_flags.sampled
                parent_id, state, remote = parent_context.span_id, parent_context.trace_state, parent_context.is_remote
            else:
                if self._clock() >= sampler.next_adjust:  # roots adjust too: unsampled ones never reach _finish
                    sampler.adjust(self._clock())
                trace_id = _getrandbits(128) or 1
                sampled = (trace_id & 0xFFFFFFFFFFFFFF) < sampler.threshold
                if sampled and sampler.kept_total >= sampler.kept_limit:  # this window's spans are spent
                    sampled = False
                parent_id, state, remote = 0, None, False
            if not sampled and not is_job:
                sampler.dropped_total += 1
                span = _new(_Unsampled)  # no __init__ frame (see _Unsampled)
                span._trace_id, span._span_id, span._state = trace_id, _getrandbits(64) or 1, state
                span._context = span._token = None
                span._scope = False
                return span, False
            job = JobTrace(sampled, not sampled and sampler.shedding, self) if is_job else None
            span = LightSpan(self, trace_id, parent_id, _SAMPLED if sampled else _NOT_SAMPLED, state, name, kind,
                             attributes, start_time, job, is_job, remote)
            if self.base_attributes:
                for key, value in self.base_attributes.items():
                    span._attributes.setdefault(key, value)
                if len(span._attributes) > MAX_SPAN_ATTRIBUTES:
                    span._cap_attributes()
        if timed:
            span._t0 = _perf_ns() - t0
        return span, False

    def start_as_current_span(self, name: str, context: otel_context.Context | None = None,
                              kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping | None = None,
                              links: Sequence | None = None, start_time: int | None = None,
                              record_exception: bool = True, set_status_on_exception: bool = True,
                              end_on_exit: bool = True):
        """A context manager (not a decorator) making the new span current for the block."""
        span, reused = self._start(name, context, kind, attributes, start_time)
        if reused:  # the unsampled parent stands in: current already, or made current by a scope of this call's
            return _Reuse(span) if context is None else _Attach(span)
        if type(span) is _Unsampled:
            span._scope = True
            return span  # its own context manager: current for the block
        if record_exception and set_status_on_exception and end_on_exit:
            span._scope = _DEFAULT_SCOPE
        else:
            span._scope = (_CURRENT | (_RECORD_EXCEPTION if record_exception else 0)
                           | (_SET_STATUS if set_status_on_exception else 0) | (_END_ON_EXIT if end_on_exit else 0))
        return span  # its own context manager: attaches on enter; records, ends and detaches on exit

    # --- end of spans --------------------------------------------------------------------------------

    def _finish(self, span: LightSpan) -> None:
        job = span._job
        sampler = self.sampler
        if job is None:  # a sampled span outside any job: _keep, inlined (the common path, no call added)
            self._emit((Kind.SPAN, Value.ERROR if span._status == 2 else Value.ROUTINE, span.record()))
            self.kept_spans += 1
            sampler.kept_total += 1
        elif job.decided:  # ended after its job's root span: the job's decision holds, unless it failed
            self._follow(job, span)
        elif not span._is_job_root:
            if span._status == 2:
                job.failed = True
            if job.sampled:  # kept whatever its outcome: written as it ends, as a span outside a job (a SIGKILL
                self._keep(span)  # mid-job then loses only what the buffer had not made durable)
            elif job.overflow or len(job.records) >= _MAX_JOB_RECORDS:
                job.overflow = True  # streamed as it ends: a failed one is an error record, kept longest
                self._keep(span)
            else:
                job.records.append(span)  # ended, so immutable: record() waits for the job's decision
                if job.decided:  # decided by another thread meanwhile, maybe after it took what was held
                    self._release_records(job)
        else:
            # An OK status set on the root is the job's own word that it did not fail (a job handed back by a
            # drain, whose cancelled calls ended in error): its children's errors do not make it a failed job.
            failed = span._status == 2 or (job.failed and span._status != 1)
            keep = job.sampled or failed or job.overflow or span._end - span._start >= self._slow_ns
            sampled = job.sampled
            job.records.append(span)
            # The decision first, then what the job holds is taken: a thread adding a span or a record meanwhile
            # finds the decision set and, if its addition came too late for this take, takes it itself.
            job.sampled, job.lean = keep, not keep
            job.decided = True
            _take_lock()  # _take of both lists, in one hold of the lock
            try:
                records, logs = job.records[:], job.logs[:]
                del job.records[:len(records)], job.logs[:len(logs)]
            finally:
                _take_unlock()
            if keep:
                value = Value.ERROR if failed else Value.ROUTINE
                for ended in records:
                    self._emit((Kind.SPAN, value, ended.record()))
                for write, args in logs:  # deferred log records (logs.RecordWriter), written now
                    write(*args)
                self.kept_spans += len(records)
                sampler.kept_total += len(records)
                if not sampled:
                    self.tail_kept_jobs += 1
            else:
                self.dropped_spans += len(records)
                sampler.dropped_total += len(records)
                self.dropped_logs += len(logs)
        self.meter.spans += 1
        if self._clock() >= sampler.next_adjust:
            sampler.adjust(self._clock())

    def _keep(self, span: LightSpan) -> None:
        """Write one ended span now (past its job's decision, or past _MAX_JOB_RECORDS): an error record when it
        failed."""
        self._emit((Kind.SPAN, Value.ERROR if span._status == 2 else Value.ROUTINE, span.record()))
        self.kept_spans += 1
        self.sampler.kept_total += 1

    def _follow(self, job: JobTrace, span: LightSpan) -> None:
        """A span of `job` past its decision: kept when the job was or when the span failed, else counted
        dropped."""
        if job.sampled or span._status == 2:
            self._keep(span)
        else:
            self.dropped_spans += 1
            self.sampler.dropped_total += 1

    def _release_records(self, job: JobTrace) -> None:
        """Spans a thread added to `job` while it was decided: they follow the decision, as a late span does."""
        for span in _take(job.records):
            self._follow(job, span)

    def _release_logs(self, job: JobTrace) -> None:
        """What `job` holds, once decided (records a thread held while it was decided follow the decision)
        or once it holds _MAX_JOB_LOGS (it is then kept: written now). See JobTrace.hold."""
        if job.decided:
            keep = job.sampled
        else:
            job.overflow = keep = True  # kept whatever its outcome; its later spans stream too
        logs = _take(job.logs)
        if keep:
            for write, args in logs:
                write(*args)
        else:
            self.dropped_logs += len(logs)

    def _stack_allowed(self) -> bool:
        """A token bucket: at most `stacks_per_second` formatted stacks a second (burst of the same size)."""
        now = self._clock()
        self._stack_tokens = min(self._stack_rate, self._stack_tokens + (now - self._stack_time) * self._stack_rate)
        self._stack_time = now
        if self._stack_tokens >= 1.0:
            self._stack_tokens -= 1.0
            return True
        return False


MAX_REQUEST_IDS = 32  # per span: a job's calls to its service (ComfyUI's socket, prompt, history, files)


def note_request_id(request_id: str) -> None:
    """Add `request_id` (an `x-request-id` sent to a service) to the current span's `request_ids` attribute,
    so a service's log line quoting it leads back to the job's trace. Only our recording spans keep them (an
    unsampled job's spans too: they are exported if the job fails); at most MAX_REQUEST_IDS a span."""
    span = _get_value(_SPAN_KEY)
    if type(span) is LightSpan and span._end == 0:
        ids = span._attributes.get("request_ids")
        if ids is None:
            if len(span._attributes) < MAX_SPAN_ATTRIBUTES:
                span._attributes["request_ids"] = [request_id]
            else:
                span._count_dropped(0, 1)
        elif len(ids) < MAX_REQUEST_IDS:
            ids.append(request_id)


def current_ids() -> tuple[int, int]:
    """(trace_id, span_id) of the current span, or (0, 0)."""
    span = _get_value(_SPAN_KEY)
    if type(span) is LightSpan or type(span) is _Unsampled:
        return span._trace_id, span._span_id
    if span is None or span is INVALID_SPAN:
        return 0, 0
    context = span.get_span_context()
    return (context.trace_id, context.span_id) if context.is_valid else (0, 0)


class TracerProvider(otel_trace.TracerProvider):
    """Hands out the one tracer, whatever the name asked for; install with `trace.set_tracer_provider`."""

    def __init__(self, tracer: Tracer):
        self._tracer = tracer

    def get_tracer(self, instrumenting_module_name: str, *args: Any, **kwargs: Any) -> Tracer:
        return self._tracer


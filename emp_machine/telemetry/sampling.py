"""The adaptive root sampler and telemetry's own overhead meter.

Root decisions are trace-id based (the low 56 bits, as W3C random trace ids and OTel's probability
samplers use), so every process that sees a trace at the same rate decides the same way, and a trace kept at
rate r is also kept at any higher rate. Once a second the rate is set so that the spans this process starts
would keep `spans_per_second` (its share of the machine's budget): the new rate follows the offered load at
once when it must go down and at most doubles per second when it may go up. A window that lasted over twice
its length (the process was stopped, throttled or idle) never raises it: its offered load, averaged over the
stall, reads low. Within a window, new roots are sampled only while the spans kept in it stay under twice the
window's target (`kept_limit`): the first second of a process (rate 1.0) or of a load step no longer keeps
everything offered (2,000 spans against a budget of 200 were seen). The overhead factor multiplies the rate
down while telemetry's measured CPU share (background threads measured exactly, hot-path operations by a timed
sample of 1 in 32, the records an unsampled job sheds and a job span's own set-up included; smoothed over a few
windows) is over budget, or while timed spans cost more than their
budget, and lets it recover by 25 % a second when under.

Timed samples are wall-clock (perf_counter) readings: thread CPU time (`time.thread_time_ns`) is a system
call costing ~0.57 us here against 0.05 us, four of them per timed span. So one sample spanning a pause (a
SIGSTOP, a CPU-quota throttle, a GC, a thread switch) is clamped to 4x the span budget (`span_cap_ns`) and to 4x
the running average (_OUTLIER), which moves the average by at most 0.4x the budget and 30 %: one pause read as 100 ms used to hold the rate at its floor for
minutes. The per-span cost is judged only in windows that had new timed samples: at the floor almost no span
is timed, and a stale average must not keep halving the factor.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

CPU_SMOOTHING = 0.25  # weight of the newest window in the CPU share the overhead control acts on
_MASK56 = (1 << 56) - 1
_ONE56 = 1 << 56


@dataclass
class SamplerStats:
    rate: float
    overhead_factor: float
    offered_per_second: float
    kept_total: int
    dropped_total: int
    cpu_share: float  # telemetry's CPU, fraction of one core, last window


# A timed sample counts at most this many times the running average. Samples are wall clock: one that took in
# another thread's turn (the buffer writer's or shipper's, whose CPU is measured on its own), a GC or a pause
# counted that too, and at 10 jobs/s one such sample took the estimate past the CPU budget and cost traces.
# A sustained rise still moves the average up by 30 % a sample.
_OUTLIER = 4.0
_FIRST_LOG_NS = 100_000  # the first log sample seeds the average with at most this (a cold line costs 30-50 us here)
_randrange = random.Random().randrange  # its own generator: a caller's random.seed() does not line it up


def next_timed_gap() -> int:
    """Operations until the next timed sample: 1 in 32 on average, at a random gap. A fixed 1 in 32 fell on the
    same place of every job (32 is a multiple of a job's 4 spans): the job's first span, touched cold after the
    worker's idle wait and many times dearer, was never timed, and the estimated share read a third of the
    true one, so the CPU budget never held the rate down."""
    return _randrange(16, 48)


def _moved(average: float, ns: float, first_cap: float) -> float:
    """A cost average after one timed sample: the first seeds it (at most `first_cap`), a later one moves it
    by at most 30 % (_OUTLIER)."""
    if not average:
        return ns if ns < first_cap else first_cap
    return 0.9 * average + 0.1 * (ns if ns < _OUTLIER * average else _OUTLIER * average)


class OverheadMeter:
    """Telemetry's cost in this process: per-operation averages from timed samples, plus background CPU."""

    __slots__ = ("span_ns", "log_ns", "shed_ns", "spans", "logs", "shed", "span_samples", "span_cap_ns",
                 "_background", "_last_background")

    def __init__(self, background_cpu: Callable[[], float] = lambda: 0.0):
        self.span_ns = 0.0   # moving average CPU cost of one span (start + end), from timed samples
        self.log_ns = 0.0
        self.spans = 0       # operations since the last window
        self.logs = 0
        # Records an unsampled job sheds while over budget (logs.RecordWriter, events): each costs a fraction of a
        # written one, but at 100 jobs/s they were ~13 a job counted nowhere, and with the job span's set-up
        # (extract, fields) the estimate read half the share the process spent: the rate settled at 0.1-0.25,
        # not at its floor.
        self.shed = 0
        self.shed_ns = 0.0
        self.span_samples = 0  # timed span samples since the last window (the sampler judges span_ns on fresh ones)
        self.span_cap_ns = float("inf")  # one sample counts at most this much (the sampler sets 4x its budget)
        self._background = background_cpu
        self._last_background = 0.0

    def sample_span(self, ns: int) -> None:
        if ns > self.span_cap_ns:  # a pause inside the timed span (wall clock), not telemetry's cost
            ns = self.span_cap_ns
        # the first seeds the average with at most the budget (a pause in it held the rate down)
        self.span_ns = _moved(self.span_ns, ns, self.span_cap_ns / 4)
        self.span_samples += 1

    def sample_log(self, ns: int) -> None:
        self.log_ns = _moved(self.log_ns, ns, _FIRST_LOG_NS)

    def sample_shed(self, ns: int) -> None:
        self.shed_ns = _moved(self.shed_ns, ns, _FIRST_LOG_NS)

    def take_window(self) -> float:
        """CPU seconds telemetry spent since the last call."""
        background = self._background()
        spent = background - self._last_background
        self._last_background = background
        spent += (self.spans * self.span_ns + self.logs * self.log_ns + self.shed * self.shed_ns) / 1e9
        self.spans = self.logs = self.shed = 0
        return spent


class AdaptiveSampler:
    """Keeps sampled spans per second near `spans_per_second` and telemetry's CPU under `cpu_budget`."""

    def __init__(self, spans_per_second: float, *, cpu_budget: float = 0.01, span_budget_us: float = 100.0,
                 meter: OverheadMeter | None = None, min_rate: float = 1e-4, window: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.target = spans_per_second
        self.cpu_budget = cpu_budget            # fraction of one core
        self.span_budget_us = span_budget_us
        self.meter = meter or OverheadMeter()
        self.meter.span_cap_ns = 4000.0 * span_budget_us  # 4x the budget, in ns (see the module's docstring)
        self.min_rate = min_rate
        self.window = window
        self._clock = clock
        self.rate = 1.0
        self.overhead_factor = 1.0
        self.threshold = _ONE56                 # sample when (trace_id & MASK56) < threshold
        self.offered = 0                        # spans started in this window (sampled or not)
        self.kept_total = 0
        self.dropped_total = 0
        self.offered_per_second = 0.0
        self.cpu_share = 0.0
        self._window_start = clock()
        self.next_adjust = self._window_start + window
        self._first_window = True
        # New roots are sampled only while kept_total < kept_limit: at most ~2x the window's target a window.
        self.kept_limit = self._window_cap()

    @property
    def shedding(self) -> bool:
        """Over the CPU budget lately (the overhead control holds the rate down): unsampled jobs then shed
        their DEBUG/INFO records instead of holding them in case the job fails."""
        return self.overhead_factor < 1.0

    def should_sample(self, trace_id: int) -> bool:
        """The root decision for `trace_id` at the current rate (and while this window's spans are under its
        cap)."""
        return (trace_id & _MASK56) < self.threshold and self.kept_total < self.kept_limit

    def _window_cap(self) -> float:
        return self.kept_total + max(2.0 * self.target * self.window, 1.0)

    def maybe_adjust(self) -> None:
        """Cheap to call often: adjusts once per window."""
        now = self._clock()
        if now >= self.next_adjust:
            self.adjust(now)

    def adjust(self, now: float) -> None:
        elapsed = max(now - self._window_start, 1e-6)
        offered = self.offered / elapsed
        self.offered = 0
        self.offered_per_second = offered
        wanted = 1.0 if offered <= self.target else self.target / offered
        base = self.rate / self.overhead_factor if self.overhead_factor else self.rate
        if wanted < base:
            base = wanted
        elif elapsed <= 2.0 * self.window:  # a stalled window's load, averaged over the stall, reads low
            base = min(wanted, base * 2.0)

        window_share = self.meter.take_window() / elapsed
        # Smoothed over a few windows: the shipper's export every few seconds is a burst that one window
        # alone reads as overspending (at 10 jobs/s: 1.3-1.6 % in that window against ~0.5 % on average).
        self.cpu_share = window_share if self._first_window else \
            self.cpu_share + CPU_SMOOTHING * (window_share - self.cpu_share)
        self._first_window = False
        over_cpu = self.cpu_share > self.cpu_budget
        meter = self.meter
        over_op = meter.span_samples > 0 and meter.span_ns / 1000.0 > self.span_budget_us  # fresh samples only
        meter.span_samples = 0
        if over_cpu or over_op:
            shrink = min(self.cpu_budget / self.cpu_share if over_cpu else 1.0, 0.5 if over_op else 1.0)
            self.overhead_factor = max(0.01, self.overhead_factor * max(shrink, 0.1))
        else:
            self.overhead_factor = min(1.0, self.overhead_factor * 1.25)

        self.rate = max(self.min_rate, min(1.0, base * self.overhead_factor))
        self.threshold = int(self.rate * _ONE56)
        self._window_start = now
        self.next_adjust = now + self.window
        self.kept_limit = self._window_cap()

    def stats(self) -> SamplerStats:
        return SamplerStats(self.rate, self.overhead_factor, self.offered_per_second, self.kept_total,
                            self.dropped_total, self.cpu_share)

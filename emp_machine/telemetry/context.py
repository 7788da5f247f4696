"""Correlation: ids, the current correlation fields, and W3C trace context in job hashes and HTTP headers.

Trace context lives in OpenTelemetry's own context (so OTel instrumentation sees our spans); the other
correlation fields (job_id, connector_id, worker_id, ...) live in one `ContextVar` holding a small dict that
`bind()` replaces for the duration of a block. Reading context back never raises: placeholders such as
`temp-trace-id`, malformed `traceparent` values and junk `tracestate` entries count as absent.
"""

from __future__ import annotations

import contextvars
import functools
import random
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
# The flags of a parent whose producer gave ids without flags (a job hash's job_trace_id/job_span_id, as
# the EMP API writes them): not sampled on the wire, and the tracer knows it by identity and lets its
# sampler decide from the trace id, as for a root (consistent across processes for one trace).
UNDECIDED = TraceFlags(TraceFlags.DEFAULT)
_getrandbits = random.getrandbits  # reseeded in forked children by the random module itself


_SPAN_KEY = otel_trace._SPAN_KEY  # the key OTel's own set_span_in_context uses (public helpers are 2x slower)


def _context_access() -> tuple[Callable, Callable, Callable, type]:
    """(get_current, set_current, reset, Context) on OTel's context. With the default contextvars runtime
    context they are its ContextVar's own methods (each public call is ~1 us of layers; a job makes ~20); any
    other runtime context goes through the public API. tests/test_telemetry_tracing.py checks both agree."""
    var = getattr(getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None)
    if not isinstance(var, contextvars.ContextVar):
        return otel_context.get_current, otel_context.attach, otel_context.detach, otel_context.Context
    return var.get, var.set, var.reset, otel_context.Context


# The hot paths (tracing's scopes) use these four directly: attaching a span is
# `_set_current(_Context({**_get_current(), _SPAN_KEY: span}))`, detaching `_reset(token)` with ValueError
# caught (a token from another context: generators, tasks; what OTel's detach logs).
_get_current, _set_current, _reset, _Context = _context_access()


def _get_value(key: str, context: otel_context.Context | None = None) -> object:
    return (_get_current() if context is None else context).get(key)




def make_span_context(trace_id: int, span_id: int, is_remote: bool, flags: TraceFlags,
                      state: TraceState | None) -> SpanContext:
    """A SpanContext for ids already known valid (non-zero, in range), without the constructor's checks
    (~0.6 us of its ~0.8). SpanContext is a tuple of these six fields; tests/test_telemetry_context.py pins
    that against the constructor, so an OpenTelemetry change fails a test rather than misbehaving."""
    return tuple.__new__(SpanContext, (trace_id, span_id, is_remote, flags,
                                       _EMPTY_STATE if state is None else state, True))


# --- ids -------------------------------------------------------------------------------------------------

def new_trace_id() -> str:
    """32 lowercase hex digits, never all zero."""
    return f"{_getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{_getrandbits(64) or 1:016x}"


def new_request_id() -> str:
    return f"req-{uuid.uuid4()}"


def new_job_id() -> str:
    """The id of a job emp-machine itself creates; jobs from other producers keep theirs."""
    return f"job-{uuid.uuid4()}"


def worker_id_for(machine_id: str, index: int) -> str:
    return f"{machine_id}-worker-{index}"


# int(text, 16) alone also takes a sign, '_' between digits, a '0x' and spaces ('4bf9_f35…' read as another
# trace id, '-…' as a negative one): an EMP id field is hex digits only (either case: not a W3C header).
_HEX_ID = re.compile(r"[0-9a-fA-F]+")


def parse_trace_id(value: object) -> int:
    """The trace id as an int, or 0 when `value` is not 32 hex digits (or is all zero)."""
    if type(value) is not str or len(value) != 32 or _HEX_ID.fullmatch(value) is None:
        return 0
    return int(value, 16)


def parse_span_id(value: object) -> int:
    if type(value) is not str or len(value) != 16 or _HEX_ID.fullmatch(value) is None:
        return 0
    return int(value, 16)


# --- correlation fields ----------------------------------------------------------------------------------

_fields: contextvars.ContextVar[dict[str, object]] = contextvars.ContextVar("emp_telemetry_fields", default={})


def current_fields() -> dict[str, object]:
    """The correlation fields bound in this context (do not mutate the returned dict)."""
    return _fields.get()


def push_fields(**fields: object) -> contextvars.Token:
    """bind() without the block: returns the token to give to `pop_fields`."""
    merged = {**_fields.get(), **fields}
    for key, value in fields.items():
        if value is None:
            del merged[key]
    return _fields.set(merged)


pop_fields = _fields.reset


@contextmanager
def bind(**fields: object) -> Iterator[None]:
    """Add correlation fields (job_id=..., connector_id=...) to every log, event and span attribute set in
    the block; a value of None removes a field."""
    token = push_fields(**fields)
    try:
        yield
    finally:
        pop_fields(token)


# --- traceparent / tracestate ----------------------------------------------------------------------------

# One W3C list member: key = lcalpha then [a-z0-9_-*/] (optionally tenant@system), value = printable
# ASCII without ',' and '=' (not ending in a space).
_TRACESTATE_MEMBER = re.compile(
    r"\s*([a-z0-9][a-z0-9_\-*/]{0,255}(?:@[a-z][a-z0-9_\-*/]{0,13})?)=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])\s*"
)
_tracestate_cache: dict[str, TraceState | None] = {}
_EMPTY_STATE = TraceState()


def format_traceparent(span_context: SpanContext) -> str:
    # SpanContext is a tuple (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid): indexing
    # and %-formatting save ~0.3 us of the attribute-and-f-string version (layout pinned by a test).
    return "00-%032x-%016x-%s" % (span_context[0], span_context[1], "01" if span_context[3] & 1 else "00")


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def parse_traceparent(value: object, tracestate: object = None) -> SpanContext | None:
    """A remote SpanContext from a `traceparent` header value, or None for anything malformed."""
    if type(value) is not str:
        return None
    # Lowercase hex only: W3C says a traceparent with upper-case hex MUST be ignored. Spaces and tabs around the
    # value are not part of it (HTTP's OWS), nor a line end a producer left in a job hash: a version-00 value
    # is 55 long.
    if len(value) != 55 or _TRACEPARENT.match(value) is None:
        value = value.strip(" \t\r\n")
        if _TRACEPARENT.match(value) is None:  # then slices are safe
            return None
    # version ff is invalid; version 00 has nothing after the flags; later versions may append "-..." fields
    if value[1] == "f" and value[0] == "f" or (len(value) > 55 and (value[:2] == "00" or value[55] != "-")):
        return None
    trace_id = int(value[3:35], 16)
    span_id = int(value[36:52], 16)
    if not trace_id or not span_id:
        return None
    flags = _SAMPLED if value[54] in _ODD_HEX else _NOT_SAMPLED  # the sampled bit of the flags byte
    return make_span_context(trace_id, span_id, True, flags, parse_tracestate(tracestate))


_ODD_HEX = frozenset("13579bdf")


def parse_tracestate(value: object) -> TraceState:
    """A TraceState from a header value; invalid members are skipped. Parsed values are cached because the
    same few tracestates (ours, a producer's) arrive again and again."""
    if not value or type(value) is not str:
        return _EMPTY_STATE
    state = _tracestate_cache.get(value)
    if state is not None:
        return state
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for member in value.split(","):
        match = _TRACESTATE_MEMBER.fullmatch(member)
        if match and match.group(1) not in seen and len(entries) < 32:
            seen.add(match.group(1))
            entries.append((match.group(1), match.group(2)))
    state = TraceState(entries) if entries else _EMPTY_STATE
    if len(_tracestate_cache) > 512:
        _tracestate_cache.clear()
    _tracestate_cache[value] = state
    return state


_UNSAFE_IN_VALUE = re.compile(r"[^\x21-\x2b\x2d-\x3a\x3c\x3e-\x7e]")


@functools.lru_cache(maxsize=64)
def emp_tracestate(machine_id: str, worker_id: str | None) -> str:
    """Our tracestate member. The issue writes it `emp=machine:…,worker:…`, but a comma separates W3C list
    members, so the two parts are joined with `;` (and unsafe characters become `_`)."""
    value = f"machine:{_UNSAFE_IN_VALUE.sub('_', machine_id)}"
    if worker_id:
        value += f";worker:{_UNSAFE_IN_VALUE.sub('_', worker_id)}"
    return f"emp={value[:256]}"


# What we pass on of a tracestate, in characters: W3C asks every vendor to propagate at least 512 and to cut
# whole members beyond what it keeps. A producer's 32 members of ~360 characters went on whole (~12 KB):
# aiohttp servers (ComfyUI's among them) refuse a header line over 8 KB, and the job failed at its first call.
TRACESTATE_MAX = 512
_LONG_MEMBER = 128  # W3C: "Entries larger than 128 characters long SHOULD be removed first"


def _merged_tracestate(state: TraceState | None, ours: str) -> str:
    """Ours first (the W3C rule for a vendor that modifies the state), others after, at most 32 members and
    TRACESTATE_MAX characters."""
    if not state:
        return ours
    return ours + _bounded_tracestate([f"{k}={v}" for k, v in state.items() if k != "emp"], 31,
                                      TRACESTATE_MAX - len(ours), ",")


def _state_header(state: TraceState | None) -> str:
    """A state passed on unchanged (no `emp` member of ours), within the same bounds."""
    return _bounded_tracestate([f"{k}={v}" for k, v in state.items()], 32, TRACESTATE_MAX) if state else ""


def _bounded_tracestate(members: list[str], count: int, size: int, lead: str = "") -> str:
    """`members` joined in order, each after `lead` (a comma after our own member, else none before the first),
    cut as W3C says: to `count` members, then, while over `size` characters, members over 128 characters go
    (from the end), then members from the end."""
    del members[count:]
    if not members:
        return ""
    header = lead + ",".join(members)
    if len(header) <= size:
        return header
    kept, i = members[:], len(members) - 1
    while i >= 0 and len(lead) + len(",".join(kept)) > size:  # long members first, from the end, only as needed
        if len(kept[i]) > _LONG_MEMBER:
            del kept[i]
        i -= 1
    while kept and len(lead) + len(",".join(kept)) > size:
        kept.pop()
    return lead + ",".join(kept) if kept else ""


# --- extraction results ----------------------------------------------------------------------------------

class Incoming(NamedTuple):
    """What arrived with a job or a request: the OTel context to parent spans on, and correlation ids.
    (A NamedTuple: a frozen dataclass costs ~1 us more to build, on every extraction.)"""

    context: otel_context.Context
    span_context: SpanContext | None
    job_id: str | None = None
    request_id: str | None = None
    workflow_trace_id: str | None = None


_ROOT = otel_context.Context()


_new_incoming = tuple.__new__
_new_span = object.__new__


def _incoming(span_context: SpanContext | None, job_id: str | None = None, request_id: str | None = None,
              workflow_trace_id: str | None = None) -> Incoming:
    # Context({...}) is what set_value(key, span, empty context) builds, without copying the empty one first;
    # tuple.__new__ skips the NamedTuple's keyword handling (~0.4 us).
    if span_context is None:
        return _new_incoming(Incoming, (_ROOT, None, job_id, request_id, workflow_trace_id))
    span = _new_span(NonRecordingSpan)  # NonRecordingSpan(span_context) without its __init__ frame
    span._context = span_context
    return _new_incoming(Incoming, (_Context({_SPAN_KEY: span}), span_context, job_id, request_id,
                                    workflow_trace_id))


def _current_span_context(context: otel_context.Context | None = None) -> SpanContext | None:
    span = _get_value(_SPAN_KEY, context)
    if span is None:
        return None
    span_context = span.get_span_context()
    return span_context if span_context[5] else None  # is_valid


# --- job hashes ------------------------------------------------------------------------------------------

def inject_job_fields(job_fields: dict, *, machine_id: str = "", worker_id: str | None = None,
                      context: otel_context.Context | None = None) -> dict:
    """Put the current (or the given) trace context into `job_fields` and return it.

    Writes W3C `traceparent` (and `tracestate` when there is one) plus the fields other EMP producers read:
    `job_trace_id`, `job_span_id`. Fields already present are overwritten; without a valid current span
    nothing is written.
    """
    span_context = _current_span_context(context)
    if span_context is None:
        return job_fields
    job_fields["traceparent"] = format_traceparent(span_context)
    state = _merged_tracestate(span_context.trace_state, emp_tracestate(machine_id, worker_id)) if machine_id \
        else _state_header(span_context.trace_state)
    if state:
        job_fields["tracestate"] = state
    job_fields["job_trace_id"] = f"{span_context.trace_id:032x}"
    job_fields["job_span_id"] = f"{span_context.span_id:016x}"
    return job_fields


def extract_job_context(job_hash: Mapping) -> Incoming:
    """The producer's context from a job hash: `traceparent` first, then `job_trace_id`/`job_span_id`
    (with UNDECIDED flags: those fields say nothing of sampling, so the tracer's sampler decides from the
    trace id; taking them as sampled kept every job's trace whatever the budget), else absent.

    Values may be str or bytes (raw Redis replies); placeholders such as `temp-trace-id` count as absent.
    `workflow_trace_id` is returned (when valid) for a span attribute, not as the parent.
    """
    get = job_hash.get  # absent and empty fields are skipped before any parsing: most jobs lack some
    traceparent = get("traceparent")
    span_context = parse_traceparent(_text(traceparent), _text(get("tracestate"))) if traceparent else None
    if span_context is None and get("job_trace_id"):
        trace_id, span_id = parse_trace_id(_text(get("job_trace_id"))), parse_span_id(_text(get("job_span_id")))
        if trace_id and span_id:
            # the tracestate goes with the traceparent: one that did not parse takes it along (W3C: "If the
            # vendor failed to parse traceparent, it MUST NOT attempt to parse tracestate")
            span_context = SpanContext(trace_id, span_id, True, UNDECIDED,
                                       _EMPTY_STATE if traceparent else parse_tracestate(_text(get("tracestate"))))
    workflow = get("workflow_trace_id")
    workflow = _text(workflow) if workflow else None
    job_id = get("id") or get("job_id")
    return _incoming(span_context, _text(job_id) if job_id else None, None,
                     workflow if workflow and parse_trace_id(workflow) else None)


def _text(value: object) -> str | None:
    """A job hash value as non-empty text (raw Redis replies may be bytes), else None."""
    if type(value) is str:
        return value or None
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace") or None
    return value if isinstance(value, str) and value else None


# --- HTTP ------------------------------------------------------------------------------------------------

_PRINTABLE_ASCII = frozenset(chr(c) for c in range(0x20, 0x7F))
_HEADER_SAFE = "".join(sorted(_PRINTABLE_ASCII - {"%"}))


def header_value(value: str) -> str:
    """`value` as an HTTP header value: as it is when it is printable ASCII, else percent-encoded (UTF-8). A job
    id is the producer's: one with a control character (ESC, CR, LF) or beyond ASCII made aiohttp refuse the
    request ("Forbidden control character ... header injection"), failing the job for good as a connector bug."""
    if value.isascii() and value.isprintable():  # (C-speed: this runs for every request a job makes)
        return value
    return urllib.parse.quote(value, safe=_HEADER_SAFE)


def http_headers(job_id: str | None = None, request_id: str | None = None, *, machine_id: str = "",
                 worker_id: str | None = None, context: otel_context.Context | None = None) -> dict[str, str]:
    """Headers for a call to a service: `traceparent`, `tracestate` (with our `emp` member), `x-job-id`,
    `x-request-id` (a new `req-…` id when none is given)."""
    headers: dict[str, str] = {"x-request-id": request_id or new_request_id()}
    if job_id:
        headers["x-job-id"] = header_value(job_id)
    span_context = _current_span_context(context)
    if span_context is not None:
        headers["traceparent"] = format_traceparent(span_context)
        state = _merged_tracestate(span_context.trace_state, emp_tracestate(machine_id, worker_id)) \
            if machine_id else _state_header(span_context.trace_state)
        if state:
            headers["tracestate"] = state
    return headers


def extract_http(headers: Mapping[str, str]) -> Incoming:
    """Read `traceparent`, `tracestate`, `x-job-id`, `x-request-id` from incoming headers: names in any case,
    several `tracestate` lines combined into one list (as W3C says), from aiohttp's headers (CIMultiDict),
    http.client / http.server's (email Message) or a plain dict."""
    getall = getattr(headers, "getall", None) or getattr(headers, "get_all", None)
    if getall is not None:  # case-insensitive already, and each line of a repeated header kept
        get = headers.get
        lines = getall("tracestate", None)
        tracestate = ",".join(lines) if lines else None
    else:
        get = {str(k).lower(): v for k, v in headers.items()}.get
        tracestate = get("tracestate")
    return _incoming(parse_traceparent(get("traceparent"), tracestate), get("x-job-id") or None,
                     get("x-request-id") or None)

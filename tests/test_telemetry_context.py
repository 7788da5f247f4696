"""Ids and trace-context propagation through job hashes and real HTTP requests."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from multidict import CIMultiDict
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from emp_machine.telemetry.context import (
    bind,
    current_fields,
    emp_tracestate,
    extract_http,
    extract_job_context,
    format_traceparent,
    http_headers,
    inject_job_fields,
    new_job_id,
    new_request_id,
    new_trace_id,
    parse_traceparent,
    worker_id_for,
)

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7


def _span(sampled: bool = True, state: TraceState | None = None) -> NonRecordingSpan:
    return NonRecordingSpan(SpanContext(TRACE, SPAN, False, TraceFlags(1 if sampled else 0), state))


def test_ids_have_the_documented_shapes():
    assert re.fullmatch(r"[0-9a-f]{32}", new_trace_id())
    assert new_trace_id() != new_trace_id()
    assert re.fullmatch(r"req-[0-9a-f-]{36}", new_request_id())
    assert re.fullmatch(r"job-[0-9a-f-]{36}", new_job_id())
    assert worker_id_for("gpu-box1", 3) == "gpu-box1-worker-3"


def test_job_hash_round_trip_keeps_trace_sampling_and_state():
    with trace.use_span(_span(state=TraceState([("vendor", "abc")]))):
        fields = inject_job_fields({"id": "job-1"}, machine_id="gpu-m1", worker_id="gpu-m1-worker-0")
    assert fields["traceparent"] == f"00-{TRACE:032x}-{SPAN:016x}-01"
    assert fields["job_trace_id"] == f"{TRACE:032x}" and fields["job_span_id"] == f"{SPAN:016x}"
    assert fields["tracestate"] == "emp=machine:gpu-m1;worker:gpu-m1-worker-0,vendor=abc"
    # Redis replies may be bytes
    incoming = extract_job_context({k: v.encode() for k, v in fields.items()})
    assert incoming.job_id == "job-1"
    sc = incoming.span_context
    assert (sc.trace_id, sc.span_id, sc.is_remote, sc.trace_flags.sampled) == (TRACE, SPAN, True, True)
    assert sc.trace_state.get("vendor") == "abc"
    assert trace.get_current_span(incoming.context).get_span_context() == sc


def test_job_hash_from_other_producers_uses_job_trace_fields():
    incoming = extract_job_context({"id": "j", "job_trace_id": f"{TRACE:032x}", "job_span_id": f"{SPAN:016x}",
                                    "workflow_trace_id": "temp-trace-id"})
    assert incoming.span_context.trace_id == TRACE and incoming.span_context.span_id == SPAN
    assert incoming.workflow_trace_id is None


def test_unsampled_parent_decision_survives_the_job_hash():
    with trace.use_span(_span(sampled=False)):
        fields = inject_job_fields({})
    assert fields["traceparent"].endswith("-00")
    assert extract_job_context(fields).span_context.trace_flags.sampled is False


def test_placeholders_and_junk_are_absent_not_errors():
    junk = [
        {"job_trace_id": "temp-trace-id", "job_span_id": "temp-span-id"},
        {"traceparent": "00-xyz", "job_trace_id": "0" * 32, "job_span_id": "1" * 16},
        {"traceparent": f"00-{'0' * 32}-{SPAN:016x}-01"},
        {"traceparent": f"ff-{TRACE:032x}-{SPAN:016x}-01"},
        {"traceparent": 42, "tracestate": ["x"]},
        {"traceparent": f"00-{TRACE:032x}-{SPAN:016x}-01-extra"},
    ]
    for job_hash in junk:
        incoming = extract_job_context(job_hash)
        assert incoming.span_context is None, job_hash
        assert not trace.get_current_span(incoming.context).get_span_context().is_valid


def test_emp_id_fields_are_hex_digits_only():
    """int(text, 16) alone took a sign, '_' between digits, '0x' and spaces: another trace id, or a negative one."""
    tid, sid = f"{TRACE:032x}", f"{SPAN:016x}"
    for bad_trace, bad_span in [(tid[:4] + "_" + tid[5:], sid), ("-" + tid[1:], sid), ("+" + tid[1:], sid),
                                ("0x" + tid[2:], sid), (" " + tid[1:], sid), (tid[:-1] + " ", sid),
                                (tid, "_" + sid[1:]), (tid, "-" + sid[1:]), (tid, "0x" + sid[2:])]:
        incoming = extract_job_context({"job_trace_id": bad_trace, "job_span_id": bad_span})
        assert incoming.span_context is None, (bad_trace, bad_span)
    # not a W3C header: either case of hex is the same id
    sc = extract_job_context({"job_trace_id": tid.upper(), "job_span_id": sid.upper()}).span_context
    assert (sc.trace_id, sc.span_id) == (TRACE, SPAN)


def test_traceparent_case_and_surrounding_white_space():
    value = f"00-{TRACE:032x}-{SPAN:016x}-01"
    # W3C: upper-case hex makes the header invalid, to be ignored
    assert parse_traceparent(value.upper()) is None
    assert parse_traceparent(f"00-{TRACE:032X}-{SPAN:016x}-01") is None
    # white space around the value is no part of it: trailing was refused while leading was taken
    for padded in (value + " ", value + "\t", value + "\n", " " + value, "\t" + value + " \r\n"):
        sc = parse_traceparent(padded)
        assert sc is not None and (sc.trace_id, sc.span_id) == (TRACE, SPAN), repr(padded)
    assert parse_traceparent("\xa0" + value) is None  # no-break space: not HTTP's white space


def test_a_tracestate_that_goes_with_a_malformed_traceparent_is_not_read():
    """W3C: "If the vendor failed to parse traceparent, it MUST NOT attempt to parse tracestate"; the EMP id
    fields still give the parent, without the state."""
    fields = {"job_trace_id": f"{TRACE:032x}", "job_span_id": f"{SPAN:016x}", "tracestate": "congo=t61rcWkgMzE"}
    sc = extract_job_context({**fields, "traceparent": "00-broken"}).span_context
    assert sc.trace_id == TRACE and not sc.trace_state
    # no traceparent at all: the state is the hash's only word and is kept
    assert extract_job_context(fields).span_context.trace_state.get("congo") == "t61rcWkgMzE"


def _long_state() -> str:
    """32 valid members of 358 characters each (~11.5 KB): what a producer may legally send."""
    return ",".join(f"{'k' * 100}{i:x}={'v' * 256}" for i in range(32))


def test_a_long_tracestate_is_cut_by_whole_members_as_w3c_says():
    shorts = ",".join(f"s{i}=x" for i in range(200))
    incoming = parse_traceparent(f"00-{TRACE:032x}-{SPAN:016x}-01",
                                 "short1=a,short2=b," + _long_state() + ",short3=c," + shorts)
    with trace.use_span(NonRecordingSpan(incoming)):
        headers = http_headers("job-1", machine_id="m1", worker_id="m1-worker-0")
        fields = inject_job_fields({}, machine_id="m1", worker_id="m1-worker-0")
        plain = inject_job_fields({})
    # 32 members are parsed: short1, short2 and 30 long ones. Ours first, then the others in their order; the
    # long ones cut from the end as far as needed: the first still fits
    first_long = f"{'k' * 100}0={'v' * 256}"
    for state in (headers["tracestate"], fields["tracestate"]):
        assert state.split(",") == ["emp=machine:m1;worker:m1-worker-0", "short1=a", "short2=b", first_long]
        assert len(state) <= 512
    assert plain["tracestate"] == f"short1=a,short2=b,{first_long}"
    # cut from the end when the short ones alone are too many characters
    many = parse_traceparent(f"00-{TRACE:032x}-{SPAN:016x}-01", ",".join(f"k{i}={'v' * 120}" for i in range(30)))
    with trace.use_span(NonRecordingSpan(many)):
        state = http_headers(machine_id="m1")["tracestate"]
    assert len(state) == 510 and state.split(",")[1:] == [f"k{i}={'v' * 120}" for i in range(4)]
    # long members go only as far as needed, from the end: two of three long ones fit
    long3 = parse_traceparent(f"00-{TRACE:032x}-{SPAN:016x}-01", ",".join(f"k{i}={'v' * 200}" for i in range(3)))
    with trace.use_span(NonRecordingSpan(long3)):
        state = http_headers(machine_id="m1")["tracestate"]
    assert [m.split("=")[0] for m in state.split(",")] == ["emp", "k0", "k1"] and len(state) <= 512


def test_a_service_accepts_a_request_made_under_a_producers_long_tracestate():
    """The whole ~12 KB tracestate went on: aiohttp servers (ComfyUI's) refuse header lines over 8 KB with a 400,
    and the job failed at its first call."""
    incoming = parse_traceparent(f"00-{TRACE:032x}-{SPAN:016x}-01", _long_state())
    assert len(incoming.trace_state) == 32
    with trace.use_span(NonRecordingSpan(incoming)):
        headers = http_headers("job-7", machine_id="m1", worker_id="m1-worker-0")
    status, seen = _through_a_local_server("POST", headers)
    assert status == 200
    assert seen.span_context.trace_id == TRACE
    assert seen.span_context.trace_state.get("emp") == "machine:m1;worker:m1-worker-0"


def test_extract_http_combines_tracestate_lines_and_reads_names_in_any_case():
    value = f"00-{TRACE:032x}-{SPAN:016x}-01"
    # two tracestate header lines, as a proxy may split them (W3C: combined into one list)
    status, incoming = _through_a_local_server("GET", CIMultiDict([
        ("traceparent", value), ("tracestate", "congo=t61rcWkgMzE"), ("tracestate", "rojo=00f067aa0ba902b7"),
        ("X-JOB-ID", "job-9")]))
    assert status == 200
    assert dict(incoming.span_context.trace_state.items()) == {"congo": "t61rcWkgMzE", "rojo": "00f067aa0ba902b7"}
    assert incoming.job_id == "job-9"
    # a plain dict with names in other cases than the ones looked up
    incoming = extract_http({"traceparent": value, "TraceState": "congo=1", "X-JOB-ID": "job-1",
                             "X-Request-ID": "req-1"})
    assert incoming.span_context.trace_state.get("congo") == "1"
    assert (incoming.job_id, incoming.request_id) == ("job-1", "req-1")
    # http.client / http.server headers (an email Message)
    import email.message

    message = email.message.Message()
    for name, text in (("Traceparent", value), ("Tracestate", "a=1"), ("tracestate", "b=2"), ("X-Job-Id", "job-2")):
        message[name] = text
    incoming = extract_http(message)
    assert dict(incoming.span_context.trace_state.items()) == {"a": "1", "b": "2"} and incoming.job_id == "job-2"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["traceparent", "tracestate", "job_trace_id", "job_span_id", "id"]),
                       st.one_of(st.text(max_size=80), st.binary(max_size=60), st.none(), st.integers())))
def test_extraction_never_raises(job_hash):
    incoming = extract_job_context(job_hash)
    assert incoming.span_context is None or incoming.span_context.is_valid
    extract_http({k: str(v) for k, v in job_hash.items()})


def test_future_traceparent_version_and_bad_tracestate_members():
    sc = parse_traceparent(f"01-{TRACE:032x}-{SPAN:016x}-01-whatever", "good=1,BAD KEY=2,,x=")
    assert sc is not None and sc.trace_id == TRACE
    assert dict(sc.trace_state.items()) == {"good": "1"}


@pytest.mark.parametrize("flags,sampled", [("01", True), ("00", False), ("03", True), ("0a", False), ("ff", True)])
def test_sampled_bit_read_from_any_flags_byte(flags, sampled):
    sc = parse_traceparent(f"00-{TRACE:032x}-{SPAN:016x}-{flags}")
    assert sc.trace_flags.sampled is sampled
    assert format_traceparent(sc) == f"00-{TRACE:032x}-{SPAN:016x}-{'01' if sampled else '00'}"


def test_versions_starting_with_f_are_only_invalid_when_ff():
    assert parse_traceparent(f"fe-{TRACE:032x}-{SPAN:016x}-01") is not None
    assert parse_traceparent(f"ef-{TRACE:032x}-{SPAN:016x}-01") is not None
    assert parse_traceparent(f"ff-{TRACE:032x}-{SPAN:016x}-01") is None


def test_emp_tracestate_is_one_valid_w3c_member():
    value = emp_tracestate("m,1=x", "w 1")
    assert value == "emp=machine:m_1_x;worker:w_1"
    assert parse_traceparent(f"00-{TRACE:032x}-{SPAN:016x}-01", value).trace_state.get("emp") == value[4:]


def _through_a_local_server(method: str, headers) -> tuple[int, object]:
    """One request with `headers` to an aiohttp server on loopback: (its status, what extract_http read from
    the headers the server got)."""
    seen: dict = {}

    async def handler(request: web.Request) -> web.Response:
        seen["incoming"] = extract_http(request.headers)
        return web.Response(text="ok")

    async def main() -> int:
        app = web.Application()
        app.router.add_route(method, "/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                async with session.request(method, f"http://127.0.0.1:{port}/", headers=headers,
                                           json={} if method == "POST" else None) as response:
                    return response.status
        finally:
            await runner.cleanup()

    status = asyncio.run(main())
    return status, seen.get("incoming")


def test_http_round_trip_through_a_local_server():
    with trace.use_span(_span()):
        headers = http_headers("job-7", machine_id="m1", worker_id="m1-worker-0")
    status, incoming = _through_a_local_server("GET", headers)
    assert status == 200
    assert incoming.job_id == "job-7"
    assert incoming.request_id == headers["x-request-id"] and headers["x-request-id"].startswith("req-")
    sc = incoming.span_context
    assert (sc.trace_id, sc.span_id, sc.trace_flags.sampled) == (TRACE, SPAN, True)
    assert sc.trace_state.get("emp") == "machine:m1;worker:m1-worker-0"


def test_headers_without_a_current_span_still_carry_ids():
    headers = http_headers("job-1", "req-1")
    assert headers == {"x-job-id": "job-1", "x-request-id": "req-1"}
    assert extract_http({"X-Job-Id": "job-1", "TraceParent": "junk"}).span_context is None


def test_bind_nests_and_restores_fields():
    with bind(job_id="j1", connector_id="c"):
        with bind(job_id="j2", connector_id=None):
            assert current_fields() == {"job_id": "j2"}
        assert current_fields() == {"job_id": "j1", "connector_id": "c"}
    assert current_fields() == {}


def test_fast_span_context_equals_the_constructors():
    from emp_machine.telemetry.context import make_span_context

    state = TraceState([("a", "1")])
    for args in [(TRACE, SPAN, True, TraceFlags(1), state), (1, 1, False, TraceFlags(0), TraceState())]:
        fast, slow = make_span_context(*args), SpanContext(*args)
        assert fast == slow and tuple(fast) == tuple(slow) and fast.is_valid
        assert (fast.trace_id, fast.span_id, fast.is_remote, fast.trace_flags, fast.trace_state) == args


def test_an_upstream_emp_member_is_replaced_not_repeated():
    # A trace crossing a second machine: W3C forbids a key twice in tracestate, and each repeat uses up one of
    # its 32 members (mutation audit M8: passing the upstream's `emp` member on as well passed every test).
    upstream = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01",
                "tracestate": "emp=machine:up;worker:up-worker-0,vendor=abc"}
    incoming = extract_job_context(upstream)
    parent = trace.set_span_in_context(NonRecordingSpan(incoming.span_context))
    for out in (inject_job_fields({}, machine_id="m2", worker_id="m2-worker-1", context=parent),
                http_headers("j", machine_id="m2", worker_id="m2-worker-1", context=parent)):
        members = [m.split("=", 1)[0] for m in out["tracestate"].split(",")]
        assert members == ["emp", "vendor"], out["tracestate"]
        assert out["tracestate"].startswith("emp=machine:m2;worker:m2-worker-1")

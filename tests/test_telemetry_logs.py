"""The JSON line a record writes: joined from cached parts, it must be exactly what encoding the record's
attributes gives, whatever the static, bound and extra fields hold (clashing keys included)."""

from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from emp_machine.telemetry import context as ctx
from emp_machine.telemetry.buffer import Kind, _line_item, _line_payload
from emp_machine.telemetry.logs import RecordWriter, _dumps

# Keys drawn from a small set, so that static, bound and extra fields often share a key with each other or
# with the keys every line sets itself (timestamp, level, message, logger, event.name, trace_id, span_id).
_KEYS = st.sampled_from(["machine_id", "worker_id", "job_id", "connector_id", "timestamp", "level", "message",
                         "logger", "event.name", "trace_id", "span_id", "model", "caf\u00e9", "q\"uote", "n"])
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                          max_size=2))
_FIELDS = st.dictionaries(_KEYS, _VALUES, max_size=5)


def _write(writer: RecordWriter, out: list, stream: io.StringIO, **call) -> tuple[str, dict]:
    stream.seek(0)
    stream.truncate()
    out.clear()
    writer._write_now(**call)
    (kind, _value, record), = out
    assert kind == Kind.LOG
    return stream.getvalue(), record[4]


@settings(max_examples=300, deadline=None)
@given(static=_FIELDS, bound=_FIELDS, fields=st.one_of(st.none(), _FIELDS),
       message=st.text(max_size=30), logger=st.sampled_from(["", "emp.worker", "caf\u00e9"]),
       event=st.sampled_from(["", "job.completed"]), ids=st.sampled_from([(0, 0), (0xABC, 0xDEF)]))
def test_the_joined_line_is_the_encoding_of_the_record(static, bound, fields, message, logger, event, ids):
    out: list = []
    stream = io.StringIO()
    writer = RecordWriter(out.append, static, stream=stream)
    for _ in range(2):  # the second call takes the cached bound text
        text, attributes = _write(writer, out, stream, time_ns=1_700_000_000_123_456_789, severity=9,
                                  message=message, fields=fields, logger=logger, event_name=event, bound=bound,
                                  trace_id=ids[0], span_id=ids[1])
        assert text == _dumps(attributes) + "\n"
        assert list(json.loads(text)) == list(dict.fromkeys(attributes))  # same keys, same order


def test_a_new_bound_dict_replaces_the_cached_one(tmp_path):
    out: list = []
    stream = io.StringIO()
    writer = RecordWriter(out.append, {"machine_id": "m1"}, stream=stream)
    lines = []
    for job in ("job-1", "job-2"):
        with ctx.bind(job_id=job):
            writer.write(9, "step done", None, "emp.worker")
            writer.write(9, "with fields", {"model": "x"}, "emp.worker")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["job_id"] for line in lines] == ["job-1", "job-1", "job-2", "job-2"]
    assert all(line["machine_id"] == "m1" for line in lines) and lines[-1]["model"] == "x"


def test_timestamps_across_millisecond_and_second_boundaries():
    from datetime import datetime, timezone

    from emp_machine.telemetry.logs import _Clock

    clock = _Clock()
    base = 1_700_000_000 * 10**9
    times = [base, base + 1, base + 999_999, base + 1_000_000, base + 999_999_999, base + 10**9,
             base - 1, base + 5 * 10**9 + 123_456_789, base + 5 * 10**9 + 123_000_000]  # back in time too
    for time_ns in times:
        second, ms = divmod(time_ns // 10**6, 1000)
        expected = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}Z"
        assert clock.iso(time_ns) == expected, time_ns


@settings(max_examples=300, deadline=None)
@given(static=_FIELDS, bound=_FIELDS, fields=st.one_of(st.none(), _FIELDS),
       message=st.text(max_size=30), logger=st.sampled_from(["", "emp.worker"]),
       event=st.sampled_from(["", "job.completed"]), ids=st.sampled_from([(0, 0), (0xABC, 0xDEF)]),
       severity=st.sampled_from([5, 9, 13, 17]))
def test_a_record_framed_from_its_line_reads_back_as_the_record(static, bound, fields, message, logger, event, ids,
                                                                severity):
    # What a stage file keeps of a log record is its JSON line (Buffer.append_line); read back after a kill,
    # it must be the record itself, its attributes as JSON gives them back.
    # A line whose fields clash with the line's own keys, or change a static or bound field, is not framed that
    # way: its record is marshalled. A field that repeats a static or bound one (same value and type) is no
    # clash: the line is the same without it.
    framed: list = []
    writer = RecordWriter(framed.append, static, stream=io.StringIO(),
                          emit_line=lambda item, line: framed.append((item, line)))
    writer._write_now(1_700_000_000_123_456_789, severity, message, fields, logger, event, bound, *ids)
    (entry,) = framed
    own = {"timestamp", "level", "message", "logger", "event.name", "trace_id", "span_id"}
    merged = {**{k: v for k, v in static.items() if v is not None}, **bound}  # the writer leaves out None statics

    def repeats(key, value) -> bool:
        kept = merged[key]
        return kept is value or (type(kept) is type(value) and type(value) in (str, int, bool) and kept == value)

    clash = bool(own & set(merged)) or any(key in own or (key in merged and not repeats(key, value))
                                           for key, value in (fields or {}).items())
    assert (len(entry) == 3) == clash  # marshalled exactly when a key clashes
    if clash:
        return
    item, line = entry
    kind, value, record = _line_item(_line_payload(item, line))
    assert (kind, value) == item[:2]
    assert record == (*item[2][:4], json.loads(_dumps(item[2][4])), *item[2][5:])


def test_lines_of_different_spans_carry_their_own_ids():
    # The writer keeps the last span's ids formatted; a line of another span (or trace) must not get them.
    out: list = []
    stream = io.StringIO()
    writer = RecordWriter(out.append, {"machine_id": "m1"}, stream=stream)
    calls = [(0xA1, 0xB1), (0xA1, 0xB2), (0xA2, 0xB2), (0xA1, 0xB1), (0, 0), (0xA1, 0xB1)]
    for trace_id, span_id in calls:
        writer._write_now(1_700_000_000_000_000_000, 9, "step", None, "emp.worker", "", {}, trace_id, span_id)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line.get("trace_id"), line.get("span_id")) for line in lines] == [
        (f"{t:032x}", f"{s:016x}") if t else (None, None) for t, s in calls]
    assert [(r[2][4].get("trace_id"), r[2][4].get("span_id")) for r in out] == [
        (line.get("trace_id"), line.get("span_id")) for line in lines]


def test_an_event_repeating_bound_fields_takes_the_joined_line_and_a_changed_one_does_not():
    framed: list = []
    stream = io.StringIO()
    writer = RecordWriter(framed.append, {"machine_id": "m1", "service_type": "simulation"}, stream=stream,
                          emit_line=lambda item, line: framed.append((item, line)))
    bound = {"job_id": "job-1", "attempt": 1}
    for fields in ({"service_type": "simulation", "job_id": "job-1", "event_type": "job.started"},
                   {"service_type": "comfyui", "job_id": "job-1"}, {"attempt": True}):  # True == 1, not alike
        writer._write_now(1_700_000_000_000_000_000, 9, "job.started", dict(fields), "", "job.started", bound, 0, 0)
    assert [len(entry) for entry in framed] == [2, 3, 3]  # joined line; marshalled (other value; other type)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["service_type"] for line in lines] == ["simulation", "comfyui", "simulation"]
    assert [line["attempt"] for line in lines] == [1, 1, True]
    assert lines[0]["event_type"] == "job.started"
    assert framed[0][1] == _dumps(framed[0][0][2][4]) + "\n"  # the joined text is the record's encoding

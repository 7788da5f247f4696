"""The JSON line a record writes: joined from cached parts, it must be exactly what encoding the record's
attributes gives, whatever the static, bound and extra fields hold (clashing keys included)."""

from __future__ import annotations

import io
import json
import time

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


# --- Telemetry.logger() and the writer against what callers pass: bad %-arguments, reused field dicts, text
# that is not UTF-8, filters. Through `setup()` as the machine and workers use it, stdout replaced by `stream`.

def _telemetry(tmp_path, stream, *, sampled: bool = True, shedding: bool = False):
    import tempfile

    from emp_machine.telemetry import TelemetryConfig, setup

    buffer_dir = tempfile.mkdtemp(dir=tmp_path)
    telemetry = setup(TelemetryConfig(), machine_id="m1", service_type="sim", buffer_path=f"{buffer_dir}/w.db",
                      stream=stream, start_shipper=False, system_metrics=False)
    sampler = telemetry.sampler
    sampler.next_adjust = float("inf")  # hold the rate where the test puts it
    if not sampled:  # the rate at its floor, as under load: a job's root is not sampled
        sampler.rate, sampler.threshold = 1e-9, 0
    if shedding:  # over the CPU budget: unsampled jobs shed their DEBUG/INFO records
        sampler.overhead_factor = 0.5
    return telemetry


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _bad_calls(log) -> None:
    """Calls whose %-arguments do not fit the message: the fast path, the keyword path, the stdlib's methods."""
    log.info("processed %d items for %s", "seven")
    log.info("progress %d%%", "half", extra={"fields": {"node": "KSampler"}})
    log.warning("%s and %s", "one")
    log.error("no placeholder", "extra-arg")


def test_arguments_that_do_not_fit_the_message_never_raise_into_the_caller(tmp_path):
    # The stdlib never raises for them (its handler reports on stderr and goes on); the connector's logger is
    # this class, so a raise here failed the job. The line is written with the arguments and the problem.
    for sampled, shedding in ((True, False), (False, False), (False, True)):  # written now, held, shed
        stream = io.StringIO()
        telemetry = _telemetry(tmp_path, stream, sampled=sampled, shedding=shedding)
        log = telemetry.logger("emp.connector.sim")
        try:
            _bad_calls(log)  # outside any job: written now
            try:
                with telemetry.job_span("job-1"):
                    _bad_calls(log)
                    raise RuntimeError("the job fails: its held records are written")
            except RuntimeError as error:
                assert "job fails" in str(error)  # the job's own failure, not a logging error
            telemetry.flush()
            lines = _lines(stream)
        finally:
            telemetry.shutdown(2)
        # The two INFO calls of the job are shed while over budget; every other call writes its line.
        assert len(lines) == (6 if shedding else 8), (sampled, shedding, lines)
        for line in lines:
            assert line["log.format_error"].startswith("TypeError: "), line
        by_message = {line["message"]: line for line in lines}
        assert by_message["processed %d items for %s"]["log.args"] == "('seven',)"
        assert by_message["progress %d%%"]["node"] == "KSampler"  # the call's own fields stay
        assert by_message["%s and %s"]["level"] == "warning"
        assert by_message["no placeholder"]["log.args"] == "('extra-arg',)"


def test_a_single_mapping_argument_formats_as_in_the_stdlib_and_arguments_are_redacted(tmp_path):
    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, stream)
    log = telemetry.logger("emp.worker")
    try:
        log.info("%(n)d items", {"n": 3})
        log.warning("%d calls with %s", "two", "Authorization: Bearer abcdef1234567890")
        lines = _lines(stream)
    finally:
        telemetry.shutdown(2)
    assert lines[0]["message"] == "3 items" and "log.format_error" not in lines[0]
    assert "abcdef1234567890" not in stream.getvalue()  # the arguments' repr is redacted like a message
    assert lines[1]["log.format_error"].startswith("TypeError")


def test_held_records_keep_the_fields_of_their_call(tmp_path):
    # An unsampled job holds its INFO records and events until it ends; written because it failed, each carries
    # the fields of its call: a caller reusing one dict must not find every held line written with the dict's
    # last values, and the bound fields are those bound where it was called, not none and not those bound when
    # the job ended (mutation audit M8).
    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, stream, sampled=False)
    log, clog = telemetry.logger("emp.connector.sim"), telemetry.connector_logger("sim-0", "sim")
    fields = {"node": None}
    try:
        try:
            with ctx.bind(job_id="job-1", connector_id="sim-0"):
                with telemetry.job_span("job-1"):
                    for node in ("LoadImage", "KSampler", "VAEDecode"):
                        fields["node"] = node
                        log.info("node executing", extra={"fields": fields})
                    fields["node"] = "after the calls"
                    with ctx.bind(phase="preprocessing"):
                        clog.started("job-1")
                    raise RuntimeError("VAEDecode failed")
        except RuntimeError:
            pass
        telemetry.flush()
        lines = _lines(stream)
    finally:
        telemetry.shutdown(2)
    held = [line for line in lines if line["message"] == "node executing"]
    assert [line["node"] for line in held] == ["LoadImage", "KSampler", "VAEDecode"]
    assert all((line.get("job_id"), line.get("connector_id")) == ("job-1", "sim-0") for line in held), held
    [started] = [line for line in lines if line.get("event.name") == "job.started"]
    assert started.get("phase") == "preprocessing", started


def test_a_line_with_text_that_is_not_utf8_reaches_stdout_and_the_log_file_once(tmp_path):
    # os.fsdecode / surrogateescape give a lone surrogate for bytes that are not UTF-8 (a file name, a
    # subprocess's output). A strict UTF-8 stream raises on it: the line was lost, and RotatingTee (stdout then
    # machine.log) lost it in its file as well, also when stdout itself takes surrogates (surrogateescape, as
    # Python sets up stdout under a C or C.UTF-8 locale).
    import os

    from emp_machine.runtime.logfile import RotatingTee

    name = os.fsdecode(b"out-\xff.png")
    for errors in ("strict", "surrogateescape"):
        folder = tmp_path / errors
        folder.mkdir()
        primary = open(folder / "stdout.txt", "w", encoding="utf-8", errors=errors)
        tee = RotatingTee(folder / "machine.log", max_bytes=10**6, backups=1, primary=primary)
        telemetry = _telemetry(tmp_path, tee)
        log = telemetry.logger("emp.worker")
        try:
            log.info("wrote %s", name)
            log.info("wrote file", extra={"fields": {"path": name}})
            telemetry.events.emit("job.completed", output=name)
            log.info("caf\u00e9 line")  # not ASCII, valid UTF-8: as it is
        finally:
            telemetry.shutdown(2)
            tee.close()
            primary.close()
        for path in (folder / "stdout.txt", folder / "machine.log"):
            lines = [json.loads(line) for line in (path.read_bytes().decode("utf-8").splitlines())]
            assert [line["message"] for line in lines] == [
                f"wrote {name}", "wrote file", "job.completed", "caf\u00e9 line"], (errors, path.name)
            assert lines[1]["path"] == name and lines[2]["output"] == name  # the JSON escape reads back as it was


def test_a_stream_of_another_encoding_gets_the_line_in_ascii(tmp_path):
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", write_through=True)
    telemetry = _telemetry(tmp_path, stream)
    try:
        telemetry.logger("emp.worker").info("caf\u00e9 \U0001f600 done", extra={"fields": {"model": "\u00e9t\u00e9"}})
    finally:
        telemetry.shutdown(2)
    (line,) = raw.getvalue().decode("ascii").splitlines()
    assert json.loads(line)["message"] == "caf\u00e9 \U0001f600 done" and json.loads(line)["model"] == "\u00e9t\u00e9"


def test_filters_added_to_a_telemetry_logger_are_applied(tmp_path):
    import logging

    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, stream)
    log = telemetry.logger("emp.connector.sim")
    seen = []

    def drop_noisy(record: logging.LogRecord) -> bool:
        seen.append((record.funcName, record.filename, record.levelno))
        return "noisy" not in record.getMessage()

    def enrich(record: logging.LogRecord) -> bool:
        record.fields = {**(getattr(record, "fields", None) or {}), "tenant": "t1"}
        return True

    def log_calls() -> None:
        log.info("noisy heartbeat %d", 1)
        log.warning("noisy heartbeat warning")
        log.info("noisy with fields", extra={"fields": {"n": 1}})
        log.info("kept %s", "line", extra={"fields": {"n": 2}})
        log.error("kept error")

    try:
        log.addFilter(drop_noisy)
        log.addFilter(enrich)
        log_calls()
        log.removeFilter(drop_noisy)
        log.removeFilter(enrich)
        log.info("noisy after the filters are gone")  # the fast path again
        lines = _lines(stream)
    finally:
        telemetry.shutdown(2)
    assert [line["message"] for line in lines] == ["kept line", "kept error", "noisy after the filters are gone"]
    assert lines[0]["n"] == 2 and lines[0]["tenant"] == "t1" and lines[1]["tenant"] == "t1"
    assert "tenant" not in lines[2]
    # The record names the caller, as the stdlib's does (not a frame of the logger's own module).
    assert seen == [("log_calls", "test_telemetry_logs.py", level)
                    for level in (logging.INFO, logging.WARNING, logging.INFO, logging.INFO, logging.ERROR)]


def test_what_an_unsampled_job_sheds_and_its_span_set_up_count_in_the_cpu_estimate(tmp_path):
    # Over the CPU budget an unsampled job sheds its INFO records and events (~13 a job in the benchmark) and
    # they were counted nowhere, nor was the job span's set-up (the producer's context read, the job id bound):
    # at 100 jobs/s the estimate read half the share the process spent, and the rate settled near 0.1-0.25
    # instead of its floor.
    telemetry = _telemetry(tmp_path, io.StringIO(), sampled=False, shedding=True)
    meter, tracer = telemetry.overhead, telemetry.tracer
    log = telemetry.logger("emp.connector.sim")
    clog = telemetry.connector_logger("sim-0", "sim")
    try:
        meter.take_window()
        root_samples = []
        for i in range(400):
            tracer._n = 1 if i % 40 == 0 else max(tracer._n, 2)  # every 40th job's root is timed
            with telemetry.job_span(f"job-{i}", job_hash={"traceparent": ""}) as span:
                if span._t0:
                    root_samples.append(span._t0)
                for _ in range(10):
                    log.info("step of %s", f"job-{i}")
                clog.started(f"job-{i}")
        assert meter.shed == 400 * 11 and meter.logs == 0  # ten lines and an event a job, none written
        assert meter.shed_ns > 0  # timed at random gaps, as written records are
        shed_part = meter.shed * meter.shed_ns / 1e9
        assert meter.take_window() >= shed_part > 0 and meter.shed == 0
        assert len(root_samples) == 10
    finally:
        telemetry.shutdown(2)


def test_a_timed_job_root_counts_its_own_set_up(tmp_path, monkeypatch):
    # The job span's sample covered the tracer's part only: reading the producer's context and binding the job
    # id (its dearest steps after an idle wait, 10-27 us each here) were telemetry's cost counted nowhere.
    from emp_machine.telemetry import context as ctx

    telemetry = _telemetry(tmp_path, io.StringIO(), sampled=False, shedding=True)
    slow_read = ctx.extract_job_context

    def extract(job_hash):
        spin_until = time.perf_counter_ns() + 2_000_000  # 2 ms of the set-up's own work
        while time.perf_counter_ns() < spin_until:
            pass
        return slow_read(job_hash)
    monkeypatch.setattr(ctx, "extract_job_context", extract)
    try:
        telemetry.tracer._n = 1  # the next span is timed
        with telemetry.job_span("job-1", job_hash={"traceparent": ""}) as span:
            assert span._t0 >= 2_000_000
    finally:
        telemetry.shutdown(2)


# -- what mutation audit M8 found unpinned -------------------------------------------------------------------

def test_a_secret_in_a_bound_field_is_redacted(tmp_path):
    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, stream)
    try:
        with ctx.bind(connector_id="c1", service_url="redis://:hunter2pass@db:6379/0", api_key="plainsecretvalue"):
            telemetry.logger("emp.probe").info("connected")
        telemetry.flush()
        text = stream.getvalue()
    finally:
        telemetry.shutdown(2)
    assert "connected" in text and "hunter2pass" not in text and "plainsecretvalue" not in text


def test_a_connectors_warning_in_an_unsampled_job_is_written_though_the_job_succeeds(tmp_path):
    # Warnings and errors are never held (issue 3): only DEBUG/INFO wait for the job's outcome.
    import logging

    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, stream, sampled=False)
    clog = telemetry.connector_logger("sim-0", "sim")
    try:
        with telemetry.job_span("job-3"):
            clog.event("job.retry", "job-3", logging.WARNING, attempt=2)
        telemetry.flush()
        lines = _lines(stream)
    finally:
        telemetry.shutdown(2)
    assert [line["level"] for line in lines if line.get("event.name") == "job.retry"] == ["warning"]


def test_a_stdlib_logger_exception_carries_the_error_message(tmp_path):
    import logging

    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, stream)
    logger = logging.getLogger("probe.stdlib.m8")
    logger.addHandler(telemetry.log_handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        try:
            raise ValueError("disk full on /models")
        except ValueError:
            logger.exception("save failed")
        telemetry.flush()
        lines = _lines(stream)
    finally:
        logger.removeHandler(telemetry.log_handler)
        telemetry.shutdown(2)
    [line] = [line for line in lines if line["message"] == "save failed"]
    assert (line["error.type"], line["error.message"]) == ("ValueError", "disk full on /models")


def test_connector_logger_fields_health_levels_and_counts(tmp_path):
    # a1111's size is width then height and the event names its job; an unhealthy check is a WARNING; a
    # counting connector logger counts a failure as failed.
    stream = io.StringIO()
    telemetry = _telemetry(tmp_path, stream)
    try:
        telemetry.connector_logger("a1111-0", "a1111").received("job-42", sampler="Euler", steps=20, size=(512, 768))
        health = telemetry.connector_logger("comfyui-0", "comfyui")
        health.health_check(True)
        health.health_check(False, reason="connection refused")
        counting = telemetry.connector_logger("sim-0", "sim", "probe-type")
        counting.completed("j1", duration_ms=10)
        counting.failed("j2", RuntimeError("boom"), duration_ms=20)
        telemetry.flush()
        lines = _lines(stream)
        points = {(a.get("type"), a.get("status")): v for a, v in telemetry.metrics.jobs_processed_total.points()}
    finally:
        telemetry.shutdown(2)
    [received] = [line for line in lines if line.get("event.name") == "job.received"]
    assert (received["width"], received["height"], received["job_id"]) == (512, 768, "job-42")
    checks = [(line["healthy"], line["level"]) for line in lines if line.get("event.name") == "service.health_check"]
    assert checks == [(True, "info"), (False, "warning")]
    assert (points.get(("probe-type", "completed")), points.get(("probe-type", "failed"))) == (1, 1)

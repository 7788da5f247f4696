"""Logs and events: stdlib logging with a JSON formatter whose correlation fields fill themselves in.

Every record carries timestamp, level, message, logger, machine_id, worker_id, service_type (fixed for the
process), the fields bound with `context.bind()` (connector_id, job_id, ...), trace_id and span_id of the
current span, and whatever the call passed in `extra={"fields": {...}}`. It is written as one JSON line to
stdout and appended to the durable buffer as an OTel log record. Messages and fields are redacted first.

Inside a job whose trace was not sampled, DEBUG and INFO records are deferred with the job's spans and written
(to the buffer and stdout, with the time of their call: on stdout they follow lines written after them) when the
job turns out failed or slow, or holds tracing._MAX_JOB_LOGS or more (it is then kept); warnings and errors are
never deferred. While telemetry is over its CPU budget, such jobs shed their
DEBUG and INFO records instead (counted). That is what keeps telemetry under its CPU budget at high job
rates (docs/telemetry.md).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import IO

from emp_machine.telemetry.buffer import Kind, Value
from emp_machine.telemetry.context import _SPAN_KEY, _fields, _get_current
from emp_machine.telemetry import redact as _redact
from emp_machine.telemetry.redact import redact_fields, redact_text
from emp_machine.telemetry.sampling import OverheadMeter, next_timed_gap
from emp_machine.telemetry.tracing import LightSpan, current_ids

_SEVERITY = {logging.DEBUG: 5, logging.INFO: 9, logging.WARNING: 13, logging.ERROR: 17, logging.CRITICAL: 21}
_LEVEL_NAME = {5: "debug", 9: "info", 13: "warning", 17: "error", 21: "critical"}
_perf_ns = time.perf_counter_ns
_time_ns = time.time_ns


def _line_encoder():
    """dict -> compact JSON text, non-ASCII kept, unknown types as str(). Calls the C encoder that
    JSONEncoder.encode would build afresh on every call (~1 us of a log line), when there is one."""
    encoder = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    iterencode = make({}, str, json.encoder.encode_basestring, None, ":", ",", False, False, True)
    join = "".join
    return lambda obj: join(iterencode(obj, 0))


_dumps = _line_encoder()
# A line for a stream that cannot encode it as it is (not UTF-8): all ASCII, the same JSON.
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, default=str, separators=(",", ":")).encode
_quote = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
# Keys every line sets itself: a bound or extra field of one of these names takes the dict path below.
_OWN_KEYS = frozenset(("timestamp", "level", "message", "logger", "event.name", "trace_id", "span_id"))
_LEVEL_UPPER = {severity: name.upper() for severity, name in _LEVEL_NAME.items()}
_LOG = Kind.LOG


def _severity(levelno: int) -> int:
    return _SEVERITY.get(levelno) or (21 if levelno >= 50 else 17 if levelno >= 40 else 13 if levelno >= 30
                                      else 9 if levelno >= 20 else 5)


def _value_of(severity: int) -> int:
    return Value.ERROR if severity >= 17 else Value.DEBUG if severity < 9 else Value.NORMAL


class _Clock:
    """ISO-8601 UTC timestamps with milliseconds: the seconds part is formatted once per second, the whole
    text once per millisecond (records come in bursts). Each cache is one tuple, replaced whole, because
    threads share a writer."""

    __slots__ = ("_second", "_milli")

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")
        self._milli: tuple[int, str] = (-1, "")

    def iso(self, time_ns: int) -> str:
        ms = time_ns // 1_000_000
        milli = self._milli
        if milli[0] == ms:
            return milli[1]
        second, rest = divmod(ms, 1000)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        text = "%s.%03dZ" % (cached[1], rest)
        self._milli = (ms, text)
        return text


def _drop_repeats(fields: dict, merged: Mapping[str, object]) -> dict:
    """`fields` less the keys that repeat a static or bound field with the same value, of the same type (the
    line is the same without them: the dict keeps the key where the static or bound field put it). Events
    carry job_id and service_type that way; each such line took the dict's encoding and a marshalled frame."""
    out = {}
    for key, value in fields.items():
        if key in merged:
            kept = merged[key]
            if kept is value or (type(kept) is type(value) and type(value) in _REPEATABLE and kept == value):
                continue
        out[key] = value
    return out


_REPEATABLE = (str, int, bool)  # equal values of these encode alike (not floats: 0.0 == -0.0)


def _unformattable(message: object, args: tuple | Mapping, fields: Mapping[str, object] | None,
                   error: Exception) -> tuple[str, Mapping[str, object] | None]:
    """The message and fields of a call whose %-arguments do not fit its message (or whose str() fails). The
    stdlib never raises into the caller for that (it reports on stderr); here the line is written with the
    message unformatted, the arguments' repr and the error in fields. A single mapping argument is the
    stdlib's `log.info("%(n)s", {"n": 1})`: that formats with the mapping."""
    if type(args) is tuple and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        try:
            return str(message) % args[0], fields
        except Exception as mapping_error:  # noqa: BLE001 (a caller's arguments: anything)
            error = mapping_error
    try:
        text = str(message)
    except Exception:  # noqa: BLE001
        text = object.__repr__(message)
    try:
        shown = repr(args)
    except Exception as repr_error:  # noqa: BLE001
        shown = f"<arguments without a repr: {type(repr_error).__name__}>"
    try:
        problem = f"{type(error).__name__}: {error}"
    except Exception:  # noqa: BLE001
        problem = type(error).__name__
    return text, {**(fields or {}), "log.args": shown, "log.format_error": problem}


def _encodable(text: str) -> str:
    """`text` as UTF-8 can write it: a lone surrogate (os.fsdecode or surrogateescape gives them for bytes
    that are not UTF-8) becomes its JSON escape (\\udcff, inside a JSON string), which reads back as the same
    text. Otherwise a strict UTF-8 stream raises and the line is lost, on stdout and in machine.log."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _format_ids(trace_id: int, span_id: int) -> tuple[int, int, str, str, str]:
    trace_hex, span_hex = f"{trace_id:032x}", f"{span_id:016x}"
    return trace_id, span_id, trace_hex, span_hex, f',"trace_id":"{trace_hex}","span_id":"{span_hex}"'


class RecordWriter:
    """Turns (level, message, fields) into a JSON line and a buffered log record. Shared by the logging
    handler, events and the job lifecycle helper, so all three look the same downstream."""

    def __init__(self, emit: Callable[[tuple], None], static_fields: Mapping[str, object], *,
                 stream: IO[str] | None = None, meter: OverheadMeter | None = None,
                 emit_line: Callable[[tuple, str], None] | None = None):
        self._emit = emit
        # With a stream: the record and its JSON line go out together (Buffer.append_line frames the line's
        # text instead of marshalling the record again).
        self._emit_line = emit_line
        self._static = {k: v for k, v in static_fields.items() if v is not None}
        # The JSON text of the static and bound fields, made once per bound dict (`context.bind()` replaces the
        # dict, never changes it): a line is then joined from strings instead of encoding ~12 keys each time.
        # One tuple (bound dict, its text or None, every key taken, static and bound merged and redacted),
        # replaced whole: threads may share a writer.
        self._bound_cache: tuple = (None, None, _OWN_KEYS, {})
        self._stream = stream
        self._write = stream.write if stream is not None else None
        self._clock = _Clock()
        # The ids of the last span a line was written in, as hex and as the line's JSON part: the lines of one
        # span follow each other. One tuple, replaced whole (threads may share a writer).
        self._ids: tuple = (0, 0, "", "", "")
        self.meter = meter or OverheadMeter()
        self._n = 32  # records until the first timed one (then at random gaps)
        self.deferred = 0
        self.shed = 0  # DEBUG/INFO records of unsampled jobs not held while over the CPU budget

    def write(self, severity: int, message: str, fields: Mapping[str, object] | None, logger: str = "",
              event_name: str = "", time_ns: int | None = None, args: tuple | None = None,
              started_ns: int = 0) -> None:
        """`args`: %-format arguments for `message` (a logger's call); formatted here, unless the record is
        shed, at the time of the call either way. `started_ns`: when the caller's own part began (perf
        counter), for a timed record to count it too (a logger call's path up to here)."""
        self._n -= 1
        timed = not self._n  # 1 in 32 at random gaps (sampling.next_timed_gap), shed records too
        if timed:
            self._n = next_timed_gap()
            t0 = started_ns or _perf_ns()
        span = _get_current().get(_SPAN_KEY)
        if type(span) is LightSpan:
            job = span._job
            if job is not None:
                if job.sampled or severity >= 13:
                    job = None  # written now
                elif job.lean:  # decided before any other work: most records' path when over budget
                    self.shed += 1
                    meter = self.meter
                    meter.shed += 1
                    if timed:
                        meter.sample_shed(_perf_ns() - t0)
                    return
            trace_id, span_id = span._trace_id, span._span_id
        elif span is None:
            job = None
            trace_id = span_id = 0
        else:
            job = None
            trace_id, span_id = current_ids()
        if args is not None:
            try:
                message = (str(message) % args) if args else str(message)
            except Exception as error:  # noqa: BLE001 (never into the caller, as the stdlib)
                message, fields = _unformattable(message, args, fields, error)
        if job is None:
            self._write_now(time_ns or _time_ns(), severity, message, fields, logger, event_name, _fields.get(),
                            trace_id, span_id)
        else:  # an unsampled job's: keep the raw parts, build the record only if the job is kept
            if fields is not None:  # a copy: the caller may reuse and change its dict before the job ends
                fields = dict(fields)
            job.hold(self._write_now, (time_ns or _time_ns(), severity, message, fields, logger, event_name,
                                       _fields.get(), trace_id, span_id))  # bounded: see JobTrace.hold
            self.deferred += 1
        self.meter.logs += 1
        if timed:
            self.meter.sample_log(_perf_ns() - t0)

    def _write_now(self, time_ns: int, severity: int, message: str, fields: Mapping[str, object] | None,
                   logger: str, event_name: str, bound: Mapping[str, object], trace_id: int, span_id: int) -> None:
        if len(message) >= _redact._state[1] and message is not event_name:  # an event's is its code-given name
            message = redact_text(message)
        # One dict serves as the record's attributes and describes the JSON line: the encoder leaves out the keys
        # that OTLP carries in their own fields (timestamp, level, message, trace_id, span_id).
        timestamp = self._clock.iso(time_ns)
        level = _LEVEL_NAME.get(severity, "info")
        cache = self._bound_cache
        if cache[0] is not bound:
            cache = self._cache_bound(bound)
        line = {"timestamp": timestamp, "level": level, "message": message, **cache[3]}
        if fields:
            fields = redact_fields(fields)
            line.update(fields)
        if logger:
            line["logger"] = logger
        if event_name:
            line["event.name"] = event_name
        if trace_id:
            ids = self._ids
            if ids[0] != trace_id or ids[1] != span_id:  # formatting the hex costs ~4k instructions a line
                ids = self._ids = _format_ids(trace_id, span_id)
            line["trace_id"] = ids[2]
            line["span_id"] = ids[3]
        item = (_LOG, _value_of(severity), (time_ns, severity, _LEVEL_UPPER.get(severity, "INFO"), message, line,
                                            trace_id, span_id, event_name))
        if self._write is None:
            self._emit(item)
            return
        # The JSON text of `line`, joined from parts (the same text as _dumps(line), which tests check): the
        # static and bound fields come encoded from the cache, the rest are few. Any key clash, or a message
        # that is not a str, takes _dumps(line), where later keys win as in the dict.
        text = cache[1]
        if fields and text is not None and not cache[2].isdisjoint(fields):
            fields = _drop_repeats(fields, cache[3])
        if text is not None and type(message) is str and (not fields or cache[2].isdisjoint(fields)):
            parts = ['{"timestamp":"', timestamp, '","level":"', level, '","message":', _quote(message), text]
            if fields:
                parts.append("," + _dumps(fields)[1:-1])
            if logger:
                parts.append(',"logger":' + _quote(logger))
            if event_name:
                parts.append(',"event.name":' + _quote(event_name))
            if trace_id:
                parts.append(ids[4])
            parts.append("}\n")
            text = "".join(parts)
            emit_line = self._emit_line  # no key clash: the line's own keys are the record's, it can stand for it
        else:
            text = _dumps(line) + "\n"
            emit_line = None
        if emit_line is None:
            self._emit(item)
        else:
            emit_line(item, text)
        if not text.isascii():  # (a flag of the str: no scan)
            text = _encodable(text)
        try:
            self._write(text)
        except UnicodeEncodeError:  # a stream not in UTF-8 (the line is valid UTF-8 now)
            try:
                self._write(_dumps_ascii(line) + "\n")
            except (OSError, ValueError):
                pass
        except (OSError, ValueError):  # a closed or broken stdout must not break the caller
            pass

    def _cache_bound(self, bound: Mapping[str, object]) -> tuple:
        # Redacted here, once per bound dict: a bound field is written with every record of its block.
        merged = redact_fields({**self._static, **bound})
        if not merged:
            cache = (bound, "", _OWN_KEYS, merged)
        elif _OWN_KEYS.isdisjoint(merged) and all(type(key) is str for key in merged):
            cache = (bound, "," + _dumps(merged)[1:-1], _OWN_KEYS.union(merged), merged)
        else:
            cache = (bound, None, _OWN_KEYS, merged)  # such lines take the dict's encoding
        self._bound_cache = cache
        return cache


class TelemetryLogHandler(logging.Handler):
    """A logging handler that writes through a `RecordWriter` (JSON line + buffer).

    Attach it to the root logger (`Telemetry.install_logging()`) or to chosen loggers. Extra structured fields
    go in `extra={"fields": {...}}`; `extra={"event_type": "..."}` names the record's event.
    """

    def __init__(self, writer: RecordWriter, level: int = logging.NOTSET):
        super().__init__(level)
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:
        """Filter and emit without the handler lock: `emit` only appends to a deque and makes one write call
        on a text stream, each safe under the GIL (the lock cost ~1 us a line)."""
        if self.filters and not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            fields = getattr(record, "fields", None)
            if record.exc_info and record.exc_info[0] is not None:
                exc_type, exc, tb = record.exc_info
                fields = {**(fields or {}), "error.type": exc_type.__qualname__, "error.message": str(exc),
                          "error.stack": "".join(traceback.format_exception(exc_type, exc, tb))}
            event_type = getattr(record, "event_type", "")
            if event_type:
                fields = {**(fields or {}), "event_type": event_type}
            event_name = ""
            if fields and "event.name" in fields:  # a named event logged as a record (the machine's steps): the
                fields = dict(fields)  # OTLP record's event_name, as an Events.emit record has (it had the
                event_name = str(fields.pop("event.name"))  # attribute only); the JSON line keeps event.name
            self.writer.write(_severity(record.levelno), message, fields, record.name, event_name,
                              int(record.created * 1e9))
        except Exception:
            self.handleError(record)


# Frames that are not a log call's caller: the stdlib's logging module and this one.
_NOT_CALLERS = frozenset((os.path.normcase(logging.addLevelName.__code__.co_filename),
                          os.path.normcase(_severity.__code__.co_filename)))


class TelemetryLogger(logging.Logger):
    """A stdlib `Logger` (same API: debug/info/warning/error/exception/log, `extra=`, levels) that hands its
    records straight to the `RecordWriter`, skipping LogRecord creation, caller lookup and handler dispatch:
    those cost ~9 us of the ~16 us a line takes through a handler. Our JSON lines carry no file/line, so
    nothing is lost. Get one from `Telemetry.logger(name)`; other libraries' loggers use the handler.

    Filters added to it (`addFilter`) are applied as the stdlib does: while it has any, each call builds a
    LogRecord (with its caller) for them, and what they leave of it (message, arguments, `fields`) is
    written. %-arguments that do not fit the message never raise into the caller (see `_unformattable`)."""

    def __init__(self, name: str, writer: RecordWriter, level: int):
        super().__init__(name, level)
        self.writer = writer
        self.propagate = False

    def setLevel(self, level) -> None:  # noqa: N802 (the stdlib's name)
        super().setLevel(level)
        # The stdlib clears the isEnabledFor cache only of loggers its manager knows; ours are not among
        # them, so without this a level change after the first call would not take effect.
        self._cache.clear()

    def debug(self, msg, *args, **kwargs) -> None:
        if self.isEnabledFor(logging.DEBUG):
            if kwargs or self.filters:
                self._log(logging.DEBUG, msg, args, **kwargs)
            else:  # the common call, without the stdlib's keyword layer
                self.writer.write(5, msg, None, self.name, "", None, args)

    def info(self, msg, *args, **kwargs) -> None:
        if self.isEnabledFor(logging.INFO):
            if kwargs or self.filters:
                self._log(logging.INFO, msg, args, **kwargs)
            else:
                self.writer.write(9, msg, None, self.name, "", None, args)

    def findCaller(self, stack_info=False, stacklevel=1):  # noqa: N802 (the stdlib's name)
        """The stdlib's, skipping this module's frames as it skips its own (for a LogRecord's caller)."""
        f = sys._getframe(0)
        while stacklevel > 0 and f.f_back is not None:
            f = f.f_back
            filename = os.path.normcase(f.f_code.co_filename)
            if filename not in _NOT_CALLERS and not ("importlib" in filename and "_bootstrap" in filename):
                stacklevel -= 1
        sinfo = None
        if stack_info:
            sinfo = "Stack (most recent call last):\n" + "".join(traceback.format_stack(f)).rstrip("\n")
        return f.f_code.co_filename, f.f_lineno, f.f_code.co_name, sinfo

    def _log(self, level, msg, args, exc_info=None, extra=None, stack_info=False, stacklevel=1) -> None:
        started = _perf_ns()  # the whole call is telemetry's cost, for the writer's timed samples
        if exc_info and not isinstance(exc_info, tuple):
            exc_info = ((type(exc_info), exc_info, exc_info.__traceback__) if isinstance(exc_info, BaseException)
                        else sys.exc_info())
        if self.filters:  # a LogRecord for them, only then (it and its caller lookup are the costly part)
            fn, lno, func, sinfo = self.findCaller(stack_info, stacklevel)
            record = self.makeRecord(self.name, level, fn, lno, msg, args, exc_info, func, extra, sinfo)
            kept = self.filter(record)
            if not kept:
                return
            if isinstance(kept, logging.LogRecord):  # Python 3.12+: a filter may return a replacement
                record = kept
            level, msg, args, exc_info, extra = record.levelno, record.msg, record.args, record.exc_info, \
                record.__dict__
        fields = extra.get("fields") if extra else None
        if extra and extra.get("event_type"):
            fields = {**(fields or {}), "event_type": extra["event_type"]}
        if exc_info and exc_info[0] is not None:
            exc_type, exc, tb = exc_info
            fields = {**(fields or {}), "error.type": exc_type.__qualname__, "error.message": str(exc),
                      "error.stack": "".join(traceback.format_exception(exc_type, exc, tb))}
        # Formatted by the writer (never raising), and not at all for a record it sheds.
        self.writer.write(_severity(level), msg, fields, self.name, "", None, args, started)


class Events:
    """`events.emit("job.completed", job_id=..., duration_ms=...)`: one named business event, written as an OTel
    log record with `event.name` and the correlation fields (and as a JSON line with `event_type`)."""

    def __init__(self, writer: RecordWriter, min_level: int = logging.NOTSET):
        self._writer = writer
        self.min_level = min_level  # events below the configured log level are not written

    def emit(self, name: str, *, level: int = logging.INFO, **fields: object) -> None:
        self.emit_fields(name, level, fields)

    def emit_fields(self, name: str, level: int, fields: dict) -> None:
        """emit() with the fields already in a dict of the caller's (which it takes over)."""
        if level < self.min_level:
            return
        fields["event_type"] = name
        self._writer.write(_severity(level), name, fields, "", name)

    def emit_captured(self, name: str, level: int, fields: dict, time_ns: int, bound: Mapping[str, object],
                      trace_id: int, span_id: int) -> None:
        """An event held by an unsampled job, written now with the time, bound fields and span of its call."""
        fields["event_type"] = name
        self._writer._write_now(time_ns, _severity(level), name, fields, "", name, bound, trace_id, span_id)

    def shed(self) -> None:
        """Count an event an unsampled job shed (its cost is taken as a shed log record's)."""
        writer = self._writer
        writer.shed += 1
        writer.meter.shed += 1

    def held(self) -> None:
        """Count an event held by an unsampled job, as RecordWriter.write counts the log records it holds."""
        self._writer.deferred += 1
        self._writer.meter.logs += 1


def stdout_stream() -> IO[str]:
    return sys.stdout

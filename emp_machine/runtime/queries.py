"""Operator queries over the job contract: submit like the EMP API, a job's timeline, stuck jobs.

Data in, data out: `cli.py` prints tables or JSON from what these return.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from emp_machine.errors import EmpError
from emp_machine.runtime.jobs import DEFAULT_MAX_RETRIES, JobStore, _number
from emp_machine.telemetry.redact import redact_text


class CannotRead(EmpError):
    """A folder of the machine's that this user may not read (its state dir is 0700, its user's alone)."""

    exit_code = 2


def cannot_read(path: Path) -> CannotRead:
    """"cannot read <path>: run this as the machine's user", naming that user (the owner of the nearest folder
    above that this user can see)."""
    import pwd

    owner = "<user>"
    for folder in (Path(path), *Path(path).parents):
        try:
            uid = folder.stat().st_uid
        except OSError:
            continue
        try:
            owner = pwd.getpwuid(uid).pw_name
        except KeyError:  # a uid with no passwd entry (docker run --user N)
            owner = str(uid)
        break
    return CannotRead(f"cannot read {path}: permission denied; run this as the machine's user (e.g. `docker exec "
                      f"-u {owner} <container> emp-machine ...`, or `sudo -u {owner} emp-machine ...`)")


def check_readable(folder: Path) -> None:
    """Raise CannotRead where this user may not list `folder` (a missing one is not this function's business)."""
    try:
        os.listdir(folder)
    except PermissionError:
        raise cannot_read(folder) from None
    except OSError:
        pass


@dataclass(frozen=True)
class Step:
    at_ms: int | None  # None for an entry with no readable time (shown, left out of the timings)
    event: str
    worker_id: str
    detail: str
    since_previous_ms: int | None


def _iso_to_ms(value: str) -> int | None:
    if not value:
        return None
    try:
        if value.replace(".", "", 1).isdigit():  # "<unix seconds>.<micros>" from the upstream claim
            return int(float(value) * 1000)
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


_STEP_ORDER = ["queue_wait_ms", "claim_to_start_ms", "preprocessing_ms", "service_call_ms", "postprocessing_ms",
               "run_ms"]


def timeline(store: JobStore, job_id: str) -> dict[str, Any] | None:
    """The job's hash, progress and each recorded step with the time since the step before."""
    data = store.timeline(job_id)
    if not data.job and not data.events:
        return None
    job = data.job
    created = _iso_to_ms(job.get("created_at", ""))
    events = list(data.events)
    if created and not any(ev.get("ev") == "submitted" for ev in events):
        # Submitted by the EMP API, which keeps no timeline: its created_at is the submission.
        events.insert(0, {"t": created, "ev": "submitted", "by": "api (created_at)"})
    from_hash = not any(ev.get("ev") != "submitted" for ev in events)
    if from_hash:  # run by an API-side / Node worker, which keeps no timeline either: the hash's times
        events = sorted(events + _hash_steps(job), key=lambda ev: _event_ms(ev.get("t")) or 0)
    steps: list[Step] = []
    previous = None
    previous_event = ""
    ahead_ms = 0  # how far the submitter's clock (created_at) runs ahead of Redis's (every later time)
    durations: dict[str, int | float | None] = {}
    last: dict[str, int] = {}
    for ev in events:
        at = _event_ms(ev.get("t"))
        name = str(ev.get("ev", "?"))
        worker = str(ev.get("worker_id") or "")
        detail = ", ".join(f"{k}={v}" for k, v in ev.items() if k not in ("t", "ev", "worker_id", "steps"))
        # Redacted as the machine's logs are: an unreadable entry's raw text (jobs._event) or an error that
        # quotes a key would otherwise be printed as it was written.
        detail = redact_text(detail)
        if at is None:  # e.g. an entry that is not JSON (jobs._event): shown as it is, no timings from it
            steps.append(Step(None, name, worker, detail, None))
            continue
        last[name] = at
        if name == "claimed" and "submitted" in last:  # the last attempt's wait (after a retry, since the retry)
            since = max(last.get("submitted", 0), last.get("failed", 0), last.get("handed_back", 0),
                        last.get("lease_expired", 0))
            durations["queue_wait_ms"] = at - since if at >= since else None  # None: clocks disagree
            if at < since and since == last.get("submitted"):
                ahead_ms = max(ahead_ms, since - at)
        if name == "started" and "claimed" in last:
            durations["claim_to_start_ms"] = at - last["claimed"]
        if isinstance(ev.get("steps"), dict):  # measured by the worker, sent with its complete/fail
            durations.update({f"{k}_ms": v for k, v in ev["steps"].items()
                              if isinstance(v, int | float) and not isinstance(v, bool)})
        since_previous = None if previous is None else at - previous
        if since_previous is not None and since_previous < 0 and previous_event == "submitted":
            # the submission stamped by the submitter's clock, the claim by Redis's: not a negative duration
            ahead_ms, since_previous = max(ahead_ms, -since_previous), None
        steps.append(Step(at, name, worker, detail, since_previous))
        previous, previous_event = at, name
    status = job.get("status", "unknown")
    finished = _iso_to_ms(job.get("completed_at", "")) if status == "completed" else \
        _iso_to_ms(job.get("failed_at", "")) if status == "failed" else None
    started = _iso_to_ms(job.get("started_at", ""))
    if from_hash and finished and started and finished >= started:
        durations["run_ms"] = finished - started  # no worker-measured steps: the start to the end
    total_ms = finished - created if finished and created else None
    if total_ms is not None and total_ms < 0:  # created_at by the API host's clock, the end by Redis's
        ahead_ms, total_ms = max(ahead_ms, -total_ms), None
    # Written by workers and the API as they were: an error or a progress message may quote a key or a URL
    # with its password (redacted as the machine's logs are).
    error = redact_text(str(job.get("error", "")))
    progress = {k: redact_text(v) if isinstance(v, str) else v for k, v in data.progress.items()}
    return {
        "job_id": job_id,
        "status": status,
        "service_required": job.get("service_required", ""),
        "retry_count": _count(job.get("retry_count")),
        # Absent or blank: the contract's default (3), as the worker reads it (jobs.Job.max_retries).
        "max_retries": _count(job.get("max_retries"), default=DEFAULT_MAX_RETRIES),
        "max_retries_is_default": _count(job.get("max_retries"), default=None) is None,
        "worker_id": job.get("worker_id", ""),
        # The hash keeps the last failure's error after a retry succeeds: an error only when the job failed.
        "error": error if status == "failed" else "",
        "earlier_error": error if status != "failed" else "",
        "trace_id": _trace_id(job),
        "total_ms": total_ms,
        # The EMP API stamps created_at with its host's clock, the rest is Redis's TIME: where the first is
        # ahead, the differences that involve it are shown as "-" (None), not as negative durations.
        "clock_note": f"the submitter's clock is ahead of Redis by {ahead_ms / 1000:.1f} s: durations from the "
                      "submission are not known" if ahead_ms else "",
        "progress": progress,
        "durations": {k: durations[k] for k in sorted((k for k in durations if k in _STEP_ORDER),
                                                      key=_STEP_ORDER.index)}
                     | {k: v for k, v in durations.items() if k not in _STEP_ORDER},
        "steps": [asdict(s) for s in steps],
    }


def _hash_steps(job: dict[str, str]) -> list[dict[str, Any]]:
    """The steps a job hash records by itself (claim, start, the end), for a job whose worker keeps no
    timeline (the EMP API's Node workers): each from its time field, with the worker or the error."""
    steps: list[dict[str, Any]] = []
    for name, field in (("claimed", "assigned_at"), ("started", "started_at"), ("completed", "completed_at"),
                        ("failed", "failed_at")):
        at = _iso_to_ms(job.get(field, ""))
        if at is None:
            continue
        step: dict[str, Any] = {"t": at, "ev": name}
        if name == "claimed" and job.get("worker_id"):
            step["worker_id"] = job["worker_id"]
        if name == "failed" and job.get("error"):
            step["error"] = job["error"]  # redacted with the rest of the detail
        step["from"] = f"job hash ({field})"
        steps.append(step)
    return steps


def stuck(store: JobStore) -> list[dict[str, Any]]:
    out = []
    for job in store.stuck_jobs():
        reasons = []
        if job.lease_expired:
            reasons.append("lease expired")
        if not job.heartbeat_alive:
            reasons.append("worker heartbeat missing")
        out.append({**asdict(job), "reason": " and ".join(reasons)})
    return out


def _event_ms(value: Any) -> int | None:
    """An event's time ("t", epoch ms) as a whole number, None when absent or not a number."""
    if isinstance(value, bool):
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _count(text: str | None, default: int = 0) -> int | str:
    """A retry count from a job hash: a number however the producer wrote it ("1", "1.0"), `default` when
    absent or blank, else the text as it is (a timeline shows a malformed job rather than failing on it)."""
    if not text or not text.strip():
        return default
    number = _number(text)
    return text if number is None else number


# A job's end, as `submit --wait` sees it: completed, failed for good, or cancelled ("cancelled" is what an
# API may write; the contract's cancel is status=failed).
END_STATUSES = ("completed", "failed", "cancelled")
_CHANNELS = ("update_job_progress", "complete_job", "job_failed", "cancel_job")
_REREAD_S = 1.0  # the job's hash is read at least this often, whatever the channels carry


def wait_for_end(client, job_id: str, on_progress, timeout_s: float,
                 on_note=None) -> dict[str, str]:
    """Follow a job's progress until it completes, fails for good or is cancelled, or the timeout; returns its
    hash (its status is not one of END_STATUSES after a timeout). `on_progress(percent, message)` gets each
    update for this job whose progress is a finite number, clamped to 0..100, the message redacted.
    A lost connection to Redis is retried with back-off until the timeout (`on_note(text)` says so, and when
    it is back); still lost then, or any other Redis error, is an EmpError naming the job, not a traceback."""
    from redis.exceptions import RedisError

    try:
        return _follow(client, job_id, on_progress, time.monotonic() + timeout_s, on_note or (lambda text: None))
    except RedisError as exc:
        raise EmpError(f"lost Redis while following job {job_id} ({exc.__class__.__name__}); the job goes "
                       f"on: `emp-machine job {job_id}` shows where it is") from None


def progress_percent(value: Any) -> float | None:
    """A progress value from a message as a percent (0..100), None when it is no finite number (another
    producer's "n/a", NaN, an object): such an update is skipped rather than shown or failed on."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return min(100.0, max(0.0, number)) if math.isfinite(number) else None


def _follow(client, job_id: str, on_progress, deadline: float, on_note) -> dict[str, str]:
    from redis.exceptions import ConnectionError as ConnectionLost
    from redis.exceptions import TimeoutError as RedisTimeout

    from emp_machine.runtime.jobs import job_key

    pubsub = None
    backoff = 0.25
    lost = None  # the connection error being retried, None while connected
    last_read = None  # monotonic time of the last read of the job's hash
    look = True  # read the job at first, after a message that may end it, and when idle
    try:
        while time.monotonic() < deadline:
            try:
                if pubsub is None:
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(*_CHANNELS)
                    look = True  # anything published while not subscribed was missed
                if look or last_read is None or time.monotonic() - last_read >= _REREAD_S:
                    job = client.hgetall(job_key(job_id))
                    last_read, look = time.monotonic(), False
                    if lost is not None:
                        on_note(f"reconnected to Redis; following job {job_id} again")
                        lost, backoff = None, 0.25
                    if not job:
                        raise EmpError(f"job {job_id} is no longer in Redis (deleted, or Redis restarted without "
                                       f"its data)")
                    if job.get("status") in END_STATUSES:
                        return job
                msg = pubsub.get_message(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except (ConnectionLost, RedisTimeout) as exc:
                if pubsub is not None:
                    _close_quietly(pubsub)
                    pubsub = None
                wait = min(backoff, deadline - time.monotonic())
                if wait <= 0:
                    raise
                if lost is None:
                    on_note(f"lost Redis ({exc.__class__.__name__}); retrying until the timeout")
                lost, backoff = exc, min(backoff * 2, 5.0)
                time.sleep(wait)  # back-off before the next attempt
                continue
            if not msg or msg.get("type") != "message":
                look = True  # quiet for a while: look, in case a message was missed
                continue
            try:
                body = json.loads(msg["data"])
            except (TypeError, ValueError):
                continue
            if not isinstance(body, dict) or body.get("job_id") != job_id:
                continue
            if "progress" in body:
                percent = progress_percent(body.get("progress"))
                if percent is not None:
                    message = body.get("message")
                    on_progress(percent, redact_text(message if isinstance(message, str) else
                                                     "" if message is None else json.dumps(message, default=str)))
            if msg.get("channel") in ("complete_job", "job_failed", "cancel_job"):
                look = True
        if lost is not None:
            raise lost
        return client.hgetall(job_key(job_id))
    finally:
        if pubsub is not None:
            _close_quietly(pubsub)


def _close_quietly(pubsub) -> None:
    try:
        pubsub.close()
    except Exception:  # closing a connection already lost: nothing more to do with it
        pass


def format_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s"


def format_at(ms: int | None) -> str:
    if ms is None:
        return "-"
    try:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    except (OverflowError, OSError, ValueError):  # a time no clock reads (a bad event's "t")
        return str(ms)


# -- "What errors occurred on this machine?" ----------------------------------------------------------------
ERROR_LEVELS = {"error", "critical", "fatal"}
ERROR_EVENTS = {"job.failed", "job.timeout", "service.unhealthy", "resource.exhausted", "boot.failed",
                "supervisord.lost", "process.start_failed"}


def recent_errors(logs_dir: Path, since_s: float, now: float | None = None, limit: int = 200) -> list[dict]:
    """Error records from the machine's log files (current and rotated), newest last.

    JSON lines count when their level is error/critical or they are an error event; raw service output
    (not JSON) counts as a Python traceback (folded into one record) or a line saying ERROR/CRITICAL,
    for files written to since `since_s` ago.
    """
    now = time.time() if now is None else now
    cutoff = now - since_s
    check_readable(Path(logs_dir))  # another user's machine: say so, not a PermissionError from glob
    found: list[dict] = []
    for path in sorted(Path(logs_dir).glob("*.log*")):
        try:
            if path.stat().st_mtime < cutoff:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        process = path.name.split(".log")[0]
        found.extend(_errors_in(text, process, cutoff, path.stat().st_mtime))
    found.sort(key=lambda e: e["at"])
    for row in found:  # raw service output was never redacted on its way into the log file
        for key in ("message", "detail", "event", "job_id", "trace_id"):  # each may be a line's own text
            if isinstance(row.get(key), str):
                row[key] = redact_text(row[key])
    return found[-limit:]


def _trace_id(job: dict) -> str:
    """The job's trace: its `job_trace_id` (the EMP API's, or a failed attempt's), else its W3C traceparent's
    (a producer that wrote only that showed none)."""
    from emp_machine.telemetry.context import parse_trace_id, parse_traceparent  # (the reader's own rules)

    trace = parse_trace_id(job.get("job_trace_id"))  # 0 for a placeholder (temp-trace-id)
    if not trace and (parent := parse_traceparent(job.get("traceparent"))) is not None:
        trace = parent.trace_id
    return f"{trace:032x}" if trace else ""


def _id_or_none(value: object) -> str | None:
    """A name or id from a service's own JSON line, as text: a number as its digits, anything else (NaN, which
    made /errors invalid JSON; a list, unhashable) as none."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _errors_in(text: str, process: str, cutoff: float, mtime: float) -> list[dict]:
    out: list[dict] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # a service's line, nested past Python's limit: not ours
                continue
            level = str(rec.get("level", "")).lower()
            name = _id_or_none(rec.get("event.name") or rec.get("event_type") or rec.get("message"))
            if level not in ERROR_LEVELS and name not in ERROR_EVENTS:
                continue
            at = _iso_to_ms(str(rec.get("timestamp", "")))
            at_s = at / 1000 if at else mtime
            if at_s < cutoff:
                continue
            out.append({"at": at_s, "process": process, "level": level or "error",
                        "message": str(rec.get("error") or rec.get("reason") or rec.get("message") or ""),
                        "event": name, "job_id": _id_or_none(rec.get("job_id")),
                        "trace_id": _id_or_none(rec.get("trace_id"))})
        elif line.startswith("Traceback (most recent call last)"):
            block = [line]
            while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
                block.append(lines[i])
                i += 1
            if i < len(lines):
                block.append(lines[i])  # the exception line itself
                i += 1
            out.append({"at": mtime, "process": process, "level": "error", "message": block[-1].strip(),
                        "event": "traceback", "job_id": None, "trace_id": None, "detail": "\n".join(block)})
        elif any(word in line for word in ("ERROR", "CRITICAL")):
            out.append({"at": mtime, "process": process, "level": "error", "message": line.strip(),
                        "event": "service.output", "job_id": None, "trace_id": None})
    return out

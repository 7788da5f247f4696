"""The EMP Redis job contract: the only module that knows key names and channels.

Wire format: `../shared/emp-redis-contract.md`, followed field by field so the EMP API server can submit
jobs and read results exactly as it does with the Node machine. Each operation is one named Lua script in
`lua/` (with `lib.lua` prepended), so every state change is atomic and costs one round trip.

Our additions beside the contract's keys (documented in docs/jobs.md):
- `jobs:idx:*`: a per-job-type, per-requirement-class index of `jobs:pending`, so a claim looks at the
  head of a few queues instead of walking the whole queue. Jobs the EMP API submits (only `jobs:pending`
  and `job:{id}`) are adopted into it from their `job_submitted` message, or by `reconcile()`.
  Retries held back by a delay (`retry_at`) wait in `jobs:idx:delayed` until due, outside their queue.
- `jobs:leases`: claim leases (job id -> expiry ms), renewed by the heartbeat, reaped when expired.
- `job:{id}:events`: an append-only timeline per job (submitted, claimed, started, failed, ...).
- channel `job_requeued`: a job went back to the queue (retry, hand-back, expired lease); wakes workers.

`JobStore` takes a sync `redis.Redis` (CLI, tests); `AsyncJobStore` a `redis.asyncio.Redis` (the
worker) and its methods return awaitables. Both run the same operation code (generators of `_Call`s).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from importlib.resources import files
from typing import Any

from emp_machine.runtime.identity import token_pid_state


# Contract keys and channels.
PENDING = "jobs:pending"
COMPLETED = "jobs:completed"
FAILED = "jobs:failed"
CH_SUBMITTED = "job_submitted"
CH_CANCEL = "cancel_job"
# Ours.
INDEX_OF = "jobs:idx:of"
LEASES = "jobs:leases"
# The slow sweep's, shared by every store on one Redis (see _JobOps._sweep_step): a STRING held for one sweep
# interval by the store taking a step, and a HASH of where the next step goes on (pending, index cursors).
SWEEP_GATE = "jobs:sweep:gate"
SWEEP_CURSORS = "jobs:sweep:cursors"
CH_REQUEUED = "job_requeued"
CANCELLED = "jobs:cancelled"  # ours: ZSET job id -> when a cancel of it was seen (lib.lua's note_cancelled)
_FIXED_KEYS = [PENDING, INDEX_OF, LEASES]

CANCELLED_ERROR = "Job cancelled by user"
DEFAULT_MAX_RETRIES = 3  # the contract's, when a job hash has no max_retries
_log = logging.getLogger("emp.jobs")
HEARTBEAT_TTL_S = 60
_CHUNK = 500

_SCRIPTS = ("submit", "adopt", "prune", "claim", "start", "progress", "complete", "fail", "hand_back",
            "heartbeat", "reap", "worker_status", "cancel")


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def progress_key(job_id: str) -> str:
    return f"job:{job_id}:progress"


def events_key(job_id: str) -> str:
    return f"job:{job_id}:events"


def active_key(worker_id: str) -> str:
    return f"jobs:active:{worker_id}"


def worker_key(worker_id: str) -> str:
    return f"worker:{worker_id}"


def heartbeat_key(worker_id: str) -> str:
    return f"worker:{worker_id}:heartbeat"


def _lua(name: str) -> str:
    return files("emp_machine.runtime").joinpath("lua", f"{name}.lua").read_text()


def _preludes(name: str) -> tuple[str, ...]:
    return ("lib", "match") if name == "claim" else ("lib",)


def script_source(name: str) -> str:
    """The text sent with EVAL / EVALSHA for script `name`: lib.lua (and match.lua for the claim), then
    the script itself; `LIBRARY` is false there (nothing the scripts keep survives the call), true in the
    function library."""
    return "\n".join(["local LIBRARY = false", *(_lua(part) for part in (*_preludes(name), name))])


@functools.cache
def function_library() -> tuple[str, str]:
    """Every script as one Redis function library (Redis >= 7, Valkey): (code for FUNCTION LOAD, the prefix
    of its function names). A library runs lib.lua and match.lua once when it loads, where EVAL re-runs
    them on every call (~30 closures, about 5 us of Redis time per call), and keeps match.lua's memo
    between calls. Each script body becomes a function that first points the library's KEYS and ARGV at
    its own arguments. Names carry a hash of the code, so machines of different versions sharing one
    Redis each call their own."""
    parts = ["local KEYS, ARGV", "local LIBRARY = true", _lua("lib"), _lua("match")]
    for name in _SCRIPTS:
        parts.append(f"redis.register_function('@{name}', function(keys, args)\nKEYS, ARGV = keys, args\n"
                     f"{_lua(name)}\nend)")
    body = "\n".join(parts)
    tag = hashlib.sha1(body.encode()).hexdigest()[:12]
    prefix = f"emp_jobs_{tag}_"
    return f"#!lua name=emp_jobs_{tag}\n" + body.replace("register_function('@", f"register_function('{prefix}"), \
        prefix


def _function_missing(error: Exception) -> bool:
    """FCALL failed because this server lacks our library (new, restarted or flushed)."""
    return "function not found" in str(error).lower()


def _fcall_refused(error: Exception) -> bool:
    """FCALL itself is not to be had: a server without functions (Redis < 7), one where it was renamed away,
    or a user whose ACL lacks it. EVALSHA runs the same scripts. (Loading the library first did not help the
    last two: it loaded, and every call then failed.)"""
    text = str(error).lower()  # (Redis 6 quotes the command `FCALL`, 7 'FCALL')
    return "fcall" in text and ("unknown command" in text or "no permissions" in text)


# Our function libraries a Redis keeps: each version of the scripts is a library of its own (~255 KB of the
# server's memory with its Lua state), loaded by the first machine of that version to call it. A store that
# loads one (the server had not got it) deletes the oldest beyond this many, by when each was last loaded
# (jobs:libraries), among those not loaded for LIBRARY_IDLE_S: one deleted while a machine still uses it is
# loaded again by that machine's next call, which notes it recent, so live versions never delete each other
# in turn (with more than LIBRARIES_KEPT of them, a load deleted the oldest, whose machines loaded it again and
# deleted the next: hundreds of loads a second, and calls failing "Function not found").
LIBRARIES_KEPT = 8
LIBRARY_IDLE_S = 3600
LIBRARIES_KEY = "jobs:libraries"  # HASH library name -> when a store last loaded it (Redis clock, ms)


def iso_now() -> str:
    """ISO-8601 UTC with milliseconds, as the API's Date.toISOString() writes it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# The contract renews `worker:{id}:heartbeat` (TTL 60 s) at least every 30 s, whatever the lease: a beat is
# a third of the lease but never more than this, which leaves 10 s for a slow beat or a health check.
HEARTBEAT_MAX_S = 20.0


def _reap_confirm_s(lease_s: float) -> float:
    """How long reap.lua waits on an expired lease before it reaps it: one renewal interval of the lease and
    half of one (at least 0.5 s)."""
    beat_s = heartbeat_interval(lease_s)
    return beat_s + max(0.5, beat_s / 2)


def heartbeat_interval(lease_s: float) -> float:
    """A worker's beat: a third of the lease (so a lease survives two lost beats), capped by the contract's
    heartbeat bound. The reaper waits one of these and a half before reaping an expired lease (reap.lua)."""
    return min(HEARTBEAT_MAX_S, max(0.2, lease_s / 3))


def submission_score(priority: float, time_ms: int) -> float:
    """The contract's score: P x 10^15 - floor(T_ms / 1000), in doubles like the TypeScript API."""
    return float(priority) * 1e15 - float(time_ms // 1000)


class Ownership(StrEnum):
    """Whether the calling worker still owns a job it is running."""

    OK = "ok"
    CANCELLED = "cancelled"  # the API failed it ("Job cancelled by user"): stop, never complete it
    LOST = "lost"  # the lease expired and the job went back to the queue or to another worker
    MISSING = "missing"  # the job hash is gone


@dataclass(frozen=True)
class Job:
    """A claimed job: the job:{id} hash as it stood right after the claim. `not_utf8`: the fields a producer
    wrote as bytes that are not UTF-8 text (in `fields` with U+FFFD in their place): the worker fails such a
    job alone as malformed, rather than taking the bytes for text."""

    id: str
    fields: dict[str, str]
    not_utf8: tuple[str, ...] = ()

    @property
    def service_required(self) -> str:
        return self.fields.get("service_required", "")

    @property
    def token(self) -> str:
        """This attempt's claim token: the assigned_at its claim wrote (ISO with ms), which every later claim
        of the job replaces. The worker passes it on each write for the job, so a late write (a retried
        reply, a reaped lease) can never land on a newer attempt, even one by the same worker."""
        return self.fields.get("assigned_at", "")

    @property
    def retry_count(self) -> int:
        """Attempts failed so far. Read as the scripts read it ("1.0" is 1); raises ValueError naming the
        field when a producer wrote something that is no count at all ("x", "-1", "1.5")."""
        return _whole(self.fields, "retry_count", 0)

    @property
    def max_retries(self) -> int:
        """As retry_count; the contract's default is 3."""
        return _whole(self.fields, "max_retries", DEFAULT_MAX_RETRIES)

    @property
    def current_step(self) -> int | None:
        """The job's workflow step (contract field), None when absent or unreadable: it is only reported."""
        return _step(self.fields.get("current_step"))

    @property
    def total_steps(self) -> int | None:
        return _step(self.fields.get("total_steps"))

    def payload(self) -> Any:
        """The decoded payload; raises ValueError when the producer wrote something that is not JSON."""
        return json.loads(self.fields.get("payload") or "null")


def _result_json(result: Any) -> str:
    """A job's result as the JSON text written to jobs:completed and complete_job. NaN and Infinity become
    null, as the API's JSON.stringify writes them: Python's json would write `NaN`, which JSON.parse refuses,
    so the API would never learn that the job finished."""
    try:
        return json.dumps(result, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(result), separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _number(text: str) -> int | None:
    """A whole, non-negative number written as "3", " 3 ", "3.0" or "3e0"; None for anything else."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and value >= 0 else None


def _whole(fields: Mapping[str, str], name: str, default: int) -> int:
    text = fields.get(name) or ""
    if not text.strip():
        return default
    value = _number(text)
    if value is None:
        raise ValueError(f"job field {name} must be a whole number >= 0, got {text[:40]!r}")
    return value


def _step(text: str | None) -> int | None:
    return _number(text) if text and text.strip() else None


@dataclass(frozen=True)
class FailOutcome:
    outcome: str  # 'retried', 'failed', or an Ownership value when the job was not ours any more
    retry_count: int


@dataclass(frozen=True)
class HeartbeatResult:
    renewed: list[str]
    lost: list[str]
    cancelled: list[str]
    missing: list[str] = field(default_factory=list)  # of `lost`, those whose job hash is gone


@dataclass(frozen=True)
class ReconcileReport:
    adopted: int
    removed_missing: int
    pruned: int


@dataclass(frozen=True)
class StuckJob:
    job_id: str
    worker_id: str
    status: str
    assigned_at: str
    lease_expired: bool
    heartbeat_alive: bool


@dataclass(frozen=True)
class Timeline:
    job: dict[str, str]
    progress: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)


def contract_fields(job_id: str, service_required: str, payload: Any, *, priority: float = 50,
                    requirements: Mapping[str, Any] | str | None = None, customer_id: str = "",
                    max_retries: int = DEFAULT_MAX_RETRIES, workflow_id: str = "",
                    workflow_priority: float | None = None,
                    workflow_datetime_ms: int | None = None, current_step: int | None = None,
                    total_steps: int | None = None, trace: Mapping[str, str] | None = None,
                    ctx: Mapping[str, Any] | None = None, created_at: str | None = None) -> dict[str, str]:
    """The job:{id} hash exactly as the EMP API writes it: every contract field, all strings."""
    def text(value: Any) -> str:
        return "" if value is None else str(value)

    if isinstance(requirements, Mapping):
        requirements = _json_field("requirements", requirements)
    trace = trace or {}
    return {
        "id": job_id,
        "service_required": service_required,
        "priority": text(priority),
        "payload": _json_field("payload", payload),
        "requirements": requirements or "",
        "customer_id": customer_id,
        "created_at": created_at or iso_now(),
        "status": "pending",
        "retry_count": "0",
        "max_retries": str(max_retries),
        "workflow_id": workflow_id,
        "workflow_priority": text(workflow_priority),
        "workflow_datetime": text(workflow_datetime_ms),
        "current_step": text(current_step),
        "total_steps": text(total_steps),
        "job_trace_id": trace.get("job_trace_id", ""),
        "job_span_id": trace.get("job_span_id", ""),
        "workflow_trace_id": trace.get("workflow_trace_id", ""),
        "workflow_span_id": trace.get("workflow_span_id", ""),
        "ctx": _json_field("ctx", dict(ctx or {})),
    }


def _json_field(name: str, value: Any) -> str:
    """A JSON field of the job hash (payload, requirements, ctx) as the JSON text the API's JSON.parse reads.
    NaN and Infinity are refused (ValueError naming the field): Python's json would write `NaN`, which is no
    JSON, and no worker or API could read the job back."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise ValueError(f"{name} holds NaN or Infinity, which JSON has no form for (the EMP API's JSON.parse "
                         f"refuses it): use null, a string or a finite number") from None



def statuses_json(statuses: Mapping[str, Any]) -> str:
    """worker:{id}'s `connector_statuses` field, as every writer of it writes it."""
    return json.dumps(dict(statuses), separators=(",", ":"))

@dataclass(frozen=True)
class _Call:
    """One round trip: a named script (args after the fixed keys) or a client method. `raw` (scripts and
    `execute_command`): the reply comes back as bytes, undecoded, for the operation to decode itself (the
    claim's job hash, or a queued id, may hold bytes a producer wrote that are not UTF-8)."""

    script: str | None
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    raw: bool = False


def _steps(steps: Mapping[str, float] | None) -> str:
    """Step timings for the timeline event, as a JSON object ('' when none)."""
    return json.dumps({k: round(float(v), 1) for k, v in steps.items()}, separators=(",", ":")) if steps else ""


# The longest retry delay fail() keeps (a service's Retry-After can say hours or be an HTTP date far ahead):
# a job must not sit unclaimable in jobs:pending for longer than this.
MAX_RETRY_DELAY_S = 300.0


def _retry_delay_ms(delay_s: float | None) -> str:
    """fail()'s retry delay as whole ms for fail.lua, capped at MAX_RETRY_DELAY_S; '' for none (None, 0,
    negative or not a number)."""
    try:
        delay = float(delay_s) if delay_s is not None else 0.0
    except (TypeError, ValueError):
        return ""
    if not delay > 0:  # also NaN
        return ""
    return str(int(min(delay, MAX_RETRY_DELAY_S) * 1000))


def _utf8(text: str) -> str:
    """`text` as Redis can take it: a lone surrogate (a service's message cut inside an emoji, passed on as a
    progress message or an error) made the client's encoder raise UnicodeEncodeError: a progress update failed
    a job that would have succeeded, and a failure could not be written at all (the job was handed back and run
    again for ever). Each such character becomes one U+FFFD."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list | tuple):
        return [_text(v) for v in value]
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return value


# A quiet subscription is PINGed after this long (JobSignals): as often as an idle worker's fallback sweep looks
# for jobs anyway, so an idle worker's cost to Redis stays that of its sweeps and heartbeats.
SIGNALS_PING_AFTER_S = 5.0
REDIS_SOCKET_TIMEOUT_S = 5.0  # a reply (or a connection) that takes longer counts as a lost connection
# TCP keepalive that notices a peer gone without a word (a dropped NAT entry) in about 25 s, not the kernel's 2 h
_KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))


def redis_socket_options(url: str) -> dict[str, Any]:
    """The socket options of a redis-py client (the worker's, the CLI's) for `url`: connect and read timeouts
    of their own, since redis-py before 8 read without a timeout (a silently dropped connection froze the
    worker for ever: no heartbeat, its job left in_progress, nothing logged). TCP keepalive for TCP only:
    redis-py's unix socket connection refuses the option with a TypeError at its first command (every worker
    of a unix:// Redis in a crash loop)."""
    options: dict[str, Any] = {"socket_connect_timeout": REDIS_SOCKET_TIMEOUT_S,
                               "socket_timeout": REDIS_SOCKET_TIMEOUT_S}
    if not url.startswith("unix:"):
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = {getattr(socket, name): value for name, value in _KEEPALIVE
                                               if hasattr(socket, name)}  # (not every platform has all three)
    return options


def _undecoded_client(client: Any) -> Any:
    """A client of the same server, credentials and connection kind as `client` (TLS, unix socket) that leaves
    replies as bytes, on a pool of its own (JobSignals' subscription, which decodes with replacement itself).
    Decoding in redis-py lost the answer to the subscription's PING: Valkey (and Redis under RESP3) answers a
    subscribed PING with a plain PONG, which redis-py's pub/sub recognises only as bytes, so every quiet
    subscription was taken for lost every 7.5 s (a `job_signals.deaf` warning and a new subscription)."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    return type(client)(connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs))


def _lenient_text(value: Any) -> str:
    """A channel name or message as text: bytes decoded as UTF-8 with replacement (any publisher may send bytes
    that are not UTF-8: strict decoding raised in the reader and cost the subscription)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _took_job(reply: list) -> bool:
    """Whether a claim's reply holds a job: {id, 0, the job's JSON} (a string), against {'', unindexed[, wait_ms]}
    (numbers). The id alone cannot say: a producer's job with an empty id was claimed, then read as "none" (its
    JSON as the wait): never run, handed back by the heartbeat and claimed again for ever."""
    return len(reply) > 2 and isinstance(reply[2], bytes)


def _claimed_job(job_id: bytes, blob: bytes) -> Job:
    """The claim's reply (id, the hash as JSON), read undecoded. A field holding bytes that are not UTF-8
    (another producer's) used to raise out of the client's own decoding, killing the worker with the job
    claimed: handed back at restart, claimed again, forever. Such a field is kept with U+FFFD in place of
    the bad bytes and named in `Job.not_utf8`, for the worker to fail that job alone."""
    try:
        return Job(job_id.decode(), json.loads(blob.decode()))
    except UnicodeDecodeError:
        pass
    fields, bad = {}, []
    for name, value in json.loads(blob.decode("utf-8", "surrogateescape")).items():
        try:
            name.encode(), value.encode()
        except UnicodeEncodeError:  # a lone surrogate: a byte that was not UTF-8
            name, value = (s.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for s in (name, value))
            bad.append(name)
        fields[name] = value
    return Job(job_id.decode(), fields, tuple(sorted(bad)))


def _options(call: _Call) -> dict[str, Any]:
    """redis-py's per-command option for a `raw` call: read the reply without decoding it (its NEVER_DECODE,
    spelled out: this module is imported without redis-py by the machine process)."""
    return {"NEVER_DECODE": []} if call.raw else {}


_Op = Generator[_Call, Any, Any]


class _JobOps:
    """The operations, written once as generators of round trips; subclasses say how to run them."""

    def __init__(self, client: Any, *, lease_s: float = 60.0, avoid_reclaim_s: float = 1.0,
                 reconcile_min_interval_s: float = 1.0, index_check_interval_s: float = 1.0,
                 sweep_interval_s: float = 5.0, busy_sweep_interval_s: float = 30.0, functions: bool = True):
        """`lease_s`: how long a claim holds without a heartbeat before the reaper re-queues it.
        `avoid_reclaim_s`: how long a job a worker just failed is left to other workers. Its requeue wakes
        idle workers at once, so a short window lets one of them take it; after that the failing worker
        may take it back, and a claim that passed it over says when (`claimable_in_s`).
        `reconcile_min_interval_s`: at most one queue reconcile per interval, triggered by a claim that
        sees jobs in jobs:pending our index lacks (by count: more pending jobs than index entries).
        `sweep_interval_s`: at most once per interval, a claim that finds nothing also takes one bounded
        step of the slow sweep (`_sweep_step`), which finds what the count misses: a job the API submitted
        while stale index entries (jobs others removed from jobs:pending, e.g. Node machines sharing the
        queue) make the counts agree. Keep it at most the worker's fallback sweep interval. The interval is
        also the whole fleet's: every store on the Redis together takes at most one step per interval.
        `busy_sweep_interval_s`: a claim that gets a job takes such a step too, at most once per this longer
        interval (after the claim, ~1 ms once in a while): a worker that never runs out of work would
        otherwise never sweep, and such a job would wait until the queue drained.
        `index_check_interval_s`: how often a claim first looks for such jobs (a claim that finds nothing
        always looks). Within the interval a job the API submitted while no worker heard `job_submitted`
        may wait behind lower-priority indexed jobs; 0 looks on every claim (~3 us of Redis time each).
        `functions`: run the scripts as a Redis function library (loaded on first use); the store falls
        back to EVALSHA by itself when the server has no functions (Redis < 7) or refuses FUNCTION LOAD."""
        self._client = client
        self.lease_ms = int(lease_s * 1000)
        self.avoid_ms = int(avoid_reclaim_s * 1000)
        self._reconcile_every = reconcile_min_interval_s
        self._last_reconcile = float("-inf")
        self._check_every = index_check_interval_s
        self._last_check = float("-inf")
        self._sweep_every = sweep_interval_s
        self._busy_sweep_every = busy_sweep_interval_s
        self._busy_sweep_from = time.monotonic()  # a new store's first claims never sweep
        self._last_sweep = float("-inf")
        self._upkeep_error = ""  # the last index upkeep failure logged (see _upkeep)
        self._unreadable_id = b""  # the last id in jobs:pending that is not UTF-8 logged (see _readable_ids)
        # After a claim that found nothing: seconds until a job it passed over (one this worker just failed)
        # is claimable by this worker; None when it passed over none.
        self.claimable_in_s: float | None = None
        self._scripts = {name: client.register_script(script_source(name)) for name in _SCRIPTS}
        self.uses_functions = functions
        prefix = function_library()[1]
        self._function_names = {name: prefix + name for name in _SCRIPTS}

    def _fcall_args(self, call: _Call) -> tuple[Any, ...]:
        return (self._function_names[call.script], len(_FIXED_KEYS), *_FIXED_KEYS, *call.args)

    def _eval_args(self, call: _Call) -> tuple[Any, Any, tuple[Any, ...]]:
        """(script, its sha, the arguments after it) for EVALSHA / EVAL of a `raw` call."""
        script = self._scripts[call.script]
        return script.script, script.sha, (len(_FIXED_KEYS), *_FIXED_KEYS, *call.args)

    def _loaded(self) -> _Op:
        """After this store loaded the library: note when, and delete our libraries beyond LIBRARIES_KEPT,
        oldest loaded first (one never noted, by a version before this, counts as oldest), among those not loaded
        for LIBRARY_IDLE_S. Housekeeping: a failure is logged, never raised into the call that loaded."""
        name = function_library()[1][:-1]
        try:
            seconds, micros = yield _Call(None, ("time",))
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            yield _Call(None, ("hset", LIBRARIES_KEY, name, now_ms))
            listing = yield _Call(None, ("function_list", "emp_jobs_*"))
            present = []
            for entry in listing or []:
                fields = dict(zip(entry[::2], entry[1::2])) if isinstance(entry, list) else dict(entry)
                library = _text(fields.get("library_name") or fields.get(b"library_name") or "")
                if library.startswith("emp_jobs_") and library != name:
                    present.append(library)
            loaded = yield _Call(None, ("hgetall", LIBRARIES_KEY))
            when: dict[str, float] = {}
            for library, at in (loaded or {}).items():
                try:
                    when[_text(library)] = float(at)
                except (TypeError, ValueError):
                    pass  # not ours to judge: counted as never noted
            present.sort(key=lambda library: when.get(library, 0.0), reverse=True)
            stale = [library for library in present[LIBRARIES_KEPT - 1:]
                     if when.get(library, 0.0) < now_ms - LIBRARY_IDLE_S * 1000]
            for library in stale:
                try:
                    yield _Call(None, ("function_delete", library))
                except Exception:  # noqa: BLE001 - deleted by another store meanwhile: gone either way
                    pass
            gone = [library for library in when if library != name and (library in stale or library not in present)]
            if gone:
                yield _Call(None, ("hdel", LIBRARIES_KEY, *gone))
        except Exception as exc:  # noqa: BLE001 (housekeeping must not fail the job call that loaded)
            _log.warning("jobs.library_prune_failed", extra={"fields": {"error": str(exc)[:300]}})

    def _fcall_failed(self, error: Exception) -> None:
        """FCALL raised: return to load the library (missing), or to use EVALSHA from now on (FCALL refused);
        re-raise anything else (the script's own error, a lost connection)."""
        if _fcall_refused(error):
            self.uses_functions = False
        elif not _function_missing(error):
            raise error

    def _load_failed(self, error: Exception) -> None:
        """FUNCTION LOAD failed: keep calling functions if the library is there now (another client loaded
        it first); use EVALSHA from now on when the server refused it; re-raise anything else (a lost
        connection says nothing about what the server supports)."""
        from redis.exceptions import ResponseError  # redis-py is there whenever a store runs scripts

        if not isinstance(error, ResponseError):
            raise error
        if "already exists" not in str(error).lower():
            self.uses_functions = False

    # ---- submission (the API's side, used by the CLI, tests and benchmarks) ----

    def _submit(self, service_required: str, payload: Any, job_id: str | None, **options: Any) -> _Op:
        job_id = job_id or f"job-{uuid.uuid4()}"  # the id scheme of jobs we create (issue 3: `job-{uuid}`)
        if job_id.endswith((":events", ":progress")):
            # job:{id}:events / job:{id}:progress are job {id}'s timeline and progress keys (the contract's
            # names): such an id's hash would be another job's. The API may still write one; the scripts cope.
            raise ValueError(f"job id {job_id!r} ends like another job's timeline or progress key "
                             f"(job:<id>:events, job:<id>:progress): choose another id")
        fields = contract_fields(job_id, service_required, payload, **options)
        flat = [x for pair in fields.items() for x in pair]
        yield _Call("submit", (job_id, *flat))
        return job_id

    def _cancel(self, job_id: str, reason: str) -> _Op:
        return bool((yield _Call("cancel", (job_id, reason))))

    # ---- claim and the index ----

    def _claim(self, capabilities: Mapping[str, Any], hints: Iterable[str], start: bool = False) -> _Op:
        if not capabilities.get("worker_id"):
            raise ValueError("worker capabilities need a worker_id")
        caps = json.dumps(capabilities, separators=(",", ":"))
        now = time.monotonic()
        check = now - self._last_check >= self._check_every and self._reconcile_allowed()
        if check:
            self._last_check = now
        begin = "1" if start else "0"
        # Replies read undecoded (raw): the job hash comes back as the producer wrote it, see _claimed_job.
        reply = yield _Call("claim", (caps, self.lease_ms, self.avoid_ms, "1" if check else "0", begin, *hints),
                            raw=True)
        if not _took_job(reply) and not int(reply[1]) and time.monotonic() - self._last_sweep >= self._sweep_every:
            # The counts agree, but stale index entries may hide an unindexed job: one bounded sweep step.
            self._last_sweep = time.monotonic()
            found = yield from self._upkeep(self._sweep_step())
            if found is None or found.adopted or found.pruned:
                reply = yield _Call("claim", (caps, self.lease_ms, self.avoid_ms, "0", begin), raw=True)
        if not _took_job(reply) and int(reply[1]) and self._reconcile_allowed():
            # Jobs the API submitted while no worker heard job_submitted: index them, then claim.
            self._last_reconcile = time.monotonic()
            yield from self._upkeep(self._reconcile())
            reply = yield _Call("claim", (caps, self.lease_ms, self.avoid_ms, "0", begin), raw=True)
        if not _took_job(reply):
            # 2 ms more, so timer rounding never brings the worker back a claim too early.
            self.claimable_in_s = int(reply[2]) / 1000 + 0.002 if len(reply) > 2 else None
            return None
        self.claimable_in_s = None
        job = _claimed_job(reply[0], reply[2])
        if time.monotonic() - max(self._last_sweep, self._busy_sweep_from) >= self._busy_sweep_every:
            # What it adopts is claimed by the next claims, in priority order. A failure here must never
            # lose the job just claimed (it would wait out its lease).
            self._last_sweep = time.monotonic()
            yield from self._upkeep(self._sweep_step())
        return job

    def _reconcile_allowed(self) -> bool:
        return time.monotonic() - self._last_reconcile >= self._reconcile_every

    def _upkeep(self, step: _Op) -> _Op:
        """A claim's index upkeep (a sweep step, a reconcile), whose failure never fails the claim: one odd
        key (another producer's job:{id}, a stray index key) used to fail every claim of every job type after
        each Redis blip. The error is logged once (again only when it changes); returns None when it failed."""
        try:
            done = yield from step
        except Exception as exc:  # noqa: BLE001 - the claim goes on; a lost connection fails the claim next
            text = f"{exc.__class__.__name__}: {exc}"[:300]
            if text != self._upkeep_error:
                self._upkeep_error = text
                _log.warning("jobs.index_upkeep_failed", extra={"fields": {
                    "event_type": "jobs.index_upkeep_failed", "error": text,
                    "effect": "claiming without it; jobs the API submitted may wait for a later sweep"}})
            return None
        self._upkeep_error = ""
        return done

    def _reconcile(self) -> _Op:
        adopted = removed = pruned = 0
        start = 0
        while True:
            queued = yield _Call(None, ("execute_command", "ZRANGE", PENDING, start, start + _CHUNK - 1), raw=True)
            if not queued:
                break
            ids = self._readable_ids(queued)
            # the whole queue: a changed hash waits for a sweep step
            a, r = (yield _Call("adopt", ("0", *ids))) if ids else (0, 0)
            adopted, removed = adopted + int(a), removed + int(r)
            start += len(queued) - int(r)  # removed ids shift the ranks after them
        cursor = 0
        while True:
            cursor, dropped = yield from self._prune_chunk(cursor)
            pruned += dropped
            if cursor == 0:
                break
        return ReconcileReport(adopted, removed, pruned)

    def _readable_ids(self, queued: list[bytes]) -> list[str]:
        """The ids of `queued` (read raw from jobs:pending) that are UTF-8 text. One that is not (another
        producer's bytes) failed the whole reconcile and every sweep step at it, so jobs the API submitted
        while no worker heard job_submitted were never indexed, never claimed. It is passed over: no worker
        can run a job its id cannot name (every key and message holds the id as text). Logged once per
        store (again when another such id is found)."""
        ids = []
        for raw in queued:
            try:
                ids.append(raw.decode())
            except UnicodeDecodeError:
                if raw != self._unreadable_id:
                    self._unreadable_id = raw
                    _log.warning("jobs.unreadable_job_id", extra={"fields": {
                        "event_type": "jobs.unreadable_job_id", "job_id": raw.decode("utf-8", "replace")[:200],
                        "effect": "left in jobs:pending, unindexed: no worker runs a job whose id is not UTF-8 "
                                  "text; its producer must write ids as UTF-8"}})
        return ids

    def _prune_chunk(self, cursor: int) -> _Op:
        """One HSCAN chunk (~_CHUNK entries) of jobs:idx:of with the entries whose job left jobs:pending
        dropped: (next cursor, 0 when the scan is complete; entries dropped)."""
        cursor, entries = yield _Call(None, ("hscan", INDEX_OF), {"cursor": cursor, "count": _CHUNK})
        dropped = int((yield _Call("prune", tuple(entries)))) if entries else 0
        return int(cursor), dropped

    def _sweep_step(self) -> _Op:
        """One bounded step of the slow sweep: adopt one ZSCAN chunk of jobs:pending and prune one HSCAN
        chunk of jobs:idx:of (~_CHUNK entries each). The cursors carry over, so successive steps cover both
        keys whatever stale entries there are (a scan returns every element present throughout a full
        iteration), without relying on the counts that stale entries can make agree.

        The steps are the fleet's, not each store's: a step is taken only by the store that gets SWEEP_GATE
        for the sweep interval (SET NX PX), and goes on from the cursors in SWEEP_CURSORS. Each idle worker
        used to take its own step every interval, from its own cursors: 64 idle workers with 20k jobs of
        another type pending kept Redis 17.7 % busy re-reading the same chunks (a step adopts each job of its
        chunk, reading its hash). Together they now cover the queue as one worker would, at the cost of one
        SET NX per interval each. Returns an empty report when another store holds the gate."""
        gate_ms = int(min(self._sweep_every, self._busy_sweep_every) * 1000)
        if gate_ms > 0 and not (yield _Call(None, ("set", SWEEP_GATE, "1"), {"nx": True, "px": gate_ms})):
            # held by another store for the interval. A gate that never expires (a stray key of any type, a
            # PERSIST) would stop the sweep for good: it is taken over, with an expiry
            if (yield _Call(None, ("pttl", SWEEP_GATE))) != -1:
                return ReconcileReport(0, 0, 0)
            yield _Call(None, ("set", SWEEP_GATE, "1"), {"px": gate_ms})
        from redis.exceptions import ResponseError  # redis-py is there whenever a store runs scripts

        try:
            cursors = yield _Call(None, ("hmget", SWEEP_CURSORS, "pending", "index"))
        except ResponseError:  # a stray key of another type: the sweep starts over (the HSET below needs a hash)
            yield _Call(None, ("delete", SWEEP_CURSORS))
            cursors = (None, None)
        pending_cursor, index_cursor = (int(c) if c and str(c).isdigit() else 0 for c in cursors)
        adopted = removed = 0
        pending_cursor, pairs = yield _Call(None, ("execute_command", "ZSCAN", PENDING, pending_cursor, "COUNT",
                                                   _CHUNK), raw=True)
        ids = self._readable_ids([member for member, _ in pairs])
        if ids:
            adopted, removed = (int(n) for n in (yield _Call("adopt", ("1", *ids))))
        index_cursor, pruned = yield from self._prune_chunk(index_cursor)
        yield _Call(None, ("hset", SWEEP_CURSORS), {"mapping": {"pending": int(pending_cursor),
                                                               "index": index_cursor}})
        return ReconcileReport(adopted, removed, pruned)

    # ---- running a job (`token`: the attempt's Job.token, '' for none; see progress()) ----

    def _start(self, job_id: str, worker_id: str, token: str = "") -> _Op:
        return Ownership((yield _Call("start", (job_id, worker_id, token))))

    def _progress(self, job_id: str, worker_id: str, percent: float, message: str,
                  current_step: int | None, total_steps: int | None, estimated_completion: str | None,
                  token: str = "") -> _Op:
        args = (job_id, worker_id, f"{max(0.0, min(100.0, float(percent))):g}", _utf8(message),
                "" if current_step is None else current_step, "" if total_steps is None else total_steps,
                _utf8(estimated_completion or ""), token)
        return Ownership((yield _Call("progress", args)))

    def _complete(self, job_id: str, worker_id: str, result: Any, message: str, final_progress: bool,
                  steps: Mapping[str, float] | None = None, token: str = "") -> _Op:
        data = _result_json(result)
        return Ownership((yield _Call("complete", (job_id, worker_id, data, _utf8(message),
                                                   "1" if final_progress else "0", _steps(steps), token))))

    def _fail(self, job_id: str, worker_id: str, error: str, retryable: bool,
              steps: Mapping[str, float] | None = None, token: str = "",
              retry_delay_s: float | None = None, trace: tuple[int, int] | None = None) -> _Op:
        ids = f"{trace[0]:032x}:{trace[1]:016x}" if trace and trace[0] and trace[1] else ""
        outcome, count = yield _Call("fail", (job_id, worker_id, _utf8(error), "1" if retryable else "0", _steps(steps),
                                              token, _retry_delay_ms(retry_delay_s), ids))
        return FailOutcome(outcome, int(count))

    def _hand_back(self, job_id: str, worker_id: str, reason: str, token: str = "", lost: bool = False) -> _Op:
        return Ownership((yield _Call("hand_back", (job_id, worker_id, _utf8(reason), token, "1" if lost else ""))))

    # ---- workers, leases, reaper ----

    def _set_worker_status(self, worker_id: str, status: str, extra: Mapping[str, str]) -> _Op:
        ttl = 0 if status == "offline" else HEARTBEAT_TTL_S
        flat = [x for pair in extra.items() for x in pair]
        return (yield _Call("worker_status", (worker_id, status, ttl, *flat)))

    def _heartbeat(self, worker_id: str) -> _Op:
        reply = yield _Call("heartbeat", (worker_id, self.lease_ms, HEARTBEAT_TTL_S))
        renewed, lost, cancelled, missing = [], [], [], []
        for state, job_id in zip(reply[::2], reply[1::2]):
            {"ok": renewed, "cancelled": cancelled}.get(state, lost).append(job_id)
            if state == "missing":
                missing.append(job_id)
        return HeartbeatResult(renewed, lost, cancelled, missing)

    def _active_jobs(self, worker_id: str) -> _Op:
        return list((yield _Call(None, ("hkeys", active_key(worker_id)))))

    def _reap(self, limit: int, confirm_s: float | None = None) -> _Op:
        if confirm_s is None:
            confirm_s = _reap_confirm_s(self.lease_ms / 1000)
        return list((yield _Call("reap", (limit, int(confirm_s * 1000)))))

    def _stuck(self) -> _Op:
        seconds, micros = yield _Call(None, ("time",))
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        found: list[StuckJob] = []
        cursor = 0
        while True:
            cursor, keys = yield _Call(None, ("scan",), {"cursor": cursor, "match": "jobs:active:*", "count": 500})
            for key in keys:
                worker_id = key.removeprefix("jobs:active:")
                kind = yield _Call(None, ("type", key))
                if kind == "none":  # the worker went offline since the scan
                    continue
                if kind != "hash":
                    raise ValueError(f"{key} holds a {kind}, not the hash of running jobs the job contract keeps "
                                     f"there for worker {worker_id}: delete or rename that stray key")
                alive = bool((yield _Call(None, ("exists", heartbeat_key(worker_id)))))
                for job_id in (yield _Call(None, ("hkeys", key))):
                    status, owner, assigned_at = yield _Call(
                        None, ("hmget", job_key(job_id), ["status", "worker_id", "assigned_at"]))
                    lease = yield _Call(None, ("zscore", LEASES, job_id))
                    expired = lease is not None and float(lease) <= now_ms
                    if status in ("assigned", "in_progress") and owner == worker_id and (expired or not alive):
                        found.append(StuckJob(job_id, worker_id, status, assigned_at or "", expired, alive))
            if int(cursor) == 0:
                return found

    # ---- reading ----

    def _timeline(self, job_id: str) -> _Op:
        job = yield _Call(None, ("hgetall", job_key(job_id)))
        progress = yield _Call(None, ("hgetall", progress_key(job_id)))
        events = yield _Call(None, ("lrange", events_key(job_id), 0, -1))
        return Timeline(job, progress, [_event(e) for e in events])

    def _is_cancelled(self, job_id: str) -> _Op:
        status = yield _Call(None, ("hget", job_key(job_id), "status"))
        return status in ("failed", "cancelled")


def _event(text: str) -> dict[str, Any]:
    """One entry of a job's event list; an entry that is no JSON object comes back as an `unreadable` event
    holding the text (cut short), so a timeline shows the rest of the job rather than failing on it."""
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    return event if isinstance(event, dict) else {"ev": "unreadable", "raw": str(text)[:200]}


def _public(op_name: str, doc: str):
    """A public method that builds the generator `op_name` and hands it to the store's driver."""
    def method(self, *args, **kwargs):
        return self._drive(getattr(self, op_name)(*args, **kwargs))
    method.__doc__ = doc
    return method


class _Api(_JobOps):
    def submit(self, service_required: str, payload: Any, *, job_id: str | None = None, **options: Any):
        """Write a job as the EMP API does (options: see contract_fields); returns its id."""
        return self._drive(self._submit(service_required, payload, job_id, **options))

    def claim(self, capabilities: Mapping[str, Any], *, hints: Iterable[str] = (), start: bool = False):
        """Claim the best job these capabilities can serve, or None. `hints`: ids from job_submitted.
        `start`: also mark it in_progress (what start() does) in the same round trip. After None,
        `claimable_in_s` says when a job this worker just failed (and passed over) may be claimed by it."""
        return self._drive(self._claim(capabilities, tuple(hints), start))

    def progress(self, job_id: str, worker_id: str, percent: float, message: str = "", *,
                 current_step: int | None = None, total_steps: int | None = None,
                 estimated_completion: str | None = None, token: str = ""):
        """Record and publish progress in one round trip; returns Ownership (CANCELLED: stop the job).
        `token` (here and in complete, fail, hand_back, start): the attempt's Job.token; with it, a write
        from an attempt the job has had a newer one since (a retried write, a reaped lease) is LOST and
        changes nothing. Without it (''), ownership is by worker id alone."""
        return self._drive(self._progress(job_id, worker_id, percent, message, current_step, total_steps,
                                          estimated_completion, token))

    def complete(self, job_id: str, worker_id: str, result: Any, message: str = "Job completed", *,
                 final_progress: bool = False, steps: Mapping[str, float] | None = None, token: str = ""):
        """Mark the job completed with `result` (references, not blobs); returns Ownership.
        `final_progress`: first record progress 100 as progress() would, in the same round trip.
        `steps`: step name -> milliseconds on the worker, kept in the job's timeline event."""
        return self._drive(self._complete(job_id, worker_id, result, message, final_progress, steps, token))

    def fail(self, job_id: str, worker_id: str, error: str, *, retryable: bool,
             steps: Mapping[str, float] | None = None, token: str = "", retry_delay_s: float | None = None,
             trace: tuple[int, int] | None = None):
        """Retry (retryable and attempts left) or fail for good; returns FailOutcome. `steps` as complete().
        `retry_delay_s` (e.g. the service's Retry-After): a retry stays in jobs:pending but no worker claims
        it before then (capped at MAX_RETRY_DELAY_S); None or 0 retries at once. `trace`: (trace id, span id)
        of the attempt's job span, written as the job's job_trace_id/job_span_id when its producer gave it no
        trace context (fail.lua), so its retry joins that trace."""
        return self._drive(self._fail(job_id, worker_id, error, retryable, steps, token, retry_delay_s, trace))

    def hand_back(self, job_id: str, worker_id: str, reason: str = "drain", *, token: str = "", lost: bool = False):
        """Return a running job to the queue without counting an attempt; returns Ownership. `lost`: the
        attempt ended with the worker process that ran it (a dead predecessor's job, a stray, a dead worker's
        at its machine's stop), also announced as the reaper announces an expired lease (job_failed,
        can_retry), so the API stops showing it on that worker; a drain's is not (nothing ended badly)."""
        return self._drive(self._hand_back(job_id, worker_id, reason, token, lost))

    def register_worker(self, worker_id: str, machine_id: str, capabilities: Mapping[str, Any],
                        connector_statuses: Mapping[str, Any] | None = None, *, instance: str = ""):
        """Write worker:{id} as idle with its capabilities and start its heartbeat key. `instance`: a token
        unique to this worker process, kept in our own `instance` field (see set_worker_status)."""
        extra = {"machine_id": machine_id, "capabilities": json.dumps(capabilities),
                 "connector_statuses": statuses_json(connector_statuses or {})}
        if instance:
            extra["instance"] = instance
        return self._drive(self._set_worker_status(worker_id, "idle", extra))

    def set_worker_status(self, worker_id: str, status: str, current_job_id: str | None = None, *,
                          instance: str = "", connector_statuses: Mapping[str, Any] | None = None):
        """idle / busy / offline (offline also deletes the heartbeat key); publishes worker_status.
        `current_job_id` (busy only) names the job shown; by default the one recorded is kept.
        `instance` (offline only): the token this process registered with; when another process registered
        the same worker id since, the write changes nothing (its status, heartbeat key and connector
        statuses stay) and returns the status as it is. `connector_statuses`: written in the same step."""
        extra = {"current_job_id": current_job_id} if status == "busy" and current_job_id else {}
        if connector_statuses is not None:
            extra["connector_statuses"] = statuses_json(connector_statuses)
        if status == "offline" and instance:
            extra["instance"] = instance
        return self._drive(self._set_worker_status(worker_id, status, extra))

    start = _public("_start", "assigned -> in_progress (job_id, worker_id, token=''); returns Ownership.")
    cancel = _public("_cancel", "Cancel a job the way the EMP API does (job_id, reason); True if it was live.")
    heartbeat = _public("_heartbeat", "Renew the heartbeat key and the worker's leases; returns HeartbeatResult.")
    active_jobs = _public("_active_jobs", "Ids in jobs:active:{worker_id}: what Redis thinks the worker runs.")
    reconcile = _public("_reconcile", "Index API-submitted jobs and drop stale index entries (the slow sweep).")
    stuck_jobs = _public("_stuck", "Assigned or running jobs whose lease or worker heartbeat expired.")
    timeline = _public("_timeline", "The job hash, its progress hash and its event list.")
    is_cancelled = _public("_is_cancelled", "True when the API cancelled (failed) the job.")

    def reap_expired_leases(self, limit: int = 100, confirm_s: float | None = None):
        """Re-queue up to `limit` jobs whose lease expired (retry count kept); returns their ids. A lease is
        reaped only once an earlier call saw it expired at least `confirm_s` ago and no heartbeat renewed it
        since (reap.lua: a clock step must not take running jobs from live workers). Default: one renewal
        interval of this store's lease and half of one (at least 0.5 s); 0 reaps at first sight."""
        return self._drive(self._reap(limit, confirm_s))


class JobStore(_Api):
    """The job contract over a sync `redis.Redis` client."""

    def _exec(self, call: _Call) -> Any:
        if call.script:
            reply = self._script(call)
            return reply if call.raw else _text(reply)
        name, *args = call.args
        reply = getattr(self._client, name)(*args, **call.kwargs, **_options(call))
        return reply if call.raw else _text(reply)

    def _script(self, call: _Call) -> Any:
        if self.uses_functions:
            try:
                return self._client.execute_command("FCALL", *self._fcall_args(call), **_options(call))
            except Exception as exc:
                self._fcall_failed(exc)
            if self.uses_functions:
                try:
                    self._client.function_load(function_library()[0])
                except Exception as exc:
                    self._load_failed(exc)
                else:
                    self._drive(self._loaded())
            if self.uses_functions:
                try:
                    return self._client.execute_command("FCALL", *self._fcall_args(call), **_options(call))
                except Exception as exc:
                    if not _function_missing(exc):
                        raise
                    # deleted again between our load and this call (another store's prune): this call by
                    # EVALSHA, the next one loads it again
        if not call.raw:
            return self._scripts[call.script](keys=_FIXED_KEYS, args=list(call.args))
        from redis.exceptions import NoScriptError

        source, sha, args = self._eval_args(call)
        try:
            return self._client.execute_command("EVALSHA", sha, *args, **_options(call))
        except NoScriptError:  # EVAL loads it for the next EVALSHA
            return self._client.execute_command("EVAL", source, *args, **_options(call))

    def _drive(self, op: _Op) -> Any:
        try:
            call = next(op)
            while True:
                try:
                    reply = self._exec(call)
                except Exception as exc:  # raised where the operation yielded: it may handle it (_claim)
                    call = op.throw(exc)
                else:
                    call = op.send(reply)
        except StopIteration as done:
            return done.value


class AsyncJobStore(_Api):
    """The job contract over a `redis.asyncio.Redis` client: every method returns an awaitable."""

    async def _exec(self, call: _Call) -> Any:
        if call.script:
            reply = await self._script(call)
            return reply if call.raw else _text(reply)
        name, *args = call.args
        reply = await getattr(self._client, name)(*args, **call.kwargs, **_options(call))
        return reply if call.raw else _text(reply)

    async def _script(self, call: _Call) -> Any:  # JobStore._script with awaits
        if self.uses_functions:
            try:
                return await self._client.execute_command("FCALL", *self._fcall_args(call), **_options(call))
            except Exception as exc:
                self._fcall_failed(exc)
            if self.uses_functions:
                try:
                    await self._client.function_load(function_library()[0])
                except Exception as exc:
                    self._load_failed(exc)
                else:
                    await self._drive(self._loaded())
            if self.uses_functions:
                try:
                    return await self._client.execute_command("FCALL", *self._fcall_args(call), **_options(call))
                except Exception as exc:
                    if not _function_missing(exc):
                        raise
        if not call.raw:
            return await self._scripts[call.script](keys=_FIXED_KEYS, args=list(call.args))
        from redis.exceptions import NoScriptError

        source, sha, args = self._eval_args(call)
        try:
            return await self._client.execute_command("EVALSHA", sha, *args, **_options(call))
        except NoScriptError:  # EVAL loads it for the next EVALSHA
            return await self._client.execute_command("EVAL", source, *args, **_options(call))

    async def _drive(self, op: _Op) -> Any:  # JobStore._drive with awaits
        try:
            call = next(op)
            while True:
                try:
                    reply = await self._exec(call)
                except Exception as exc:
                    call = op.throw(exc)
                else:
                    call = op.send(reply)
        except StopIteration as done:
            return done.value


def _resolve(future: asyncio.Future, value: bool) -> None:
    if not future.done():
        future.set_result(value)


async def cancel_and_wait(tasks: list[asyncio.Task], patience_s: float = 1.0) -> None:
    """Cancel `tasks` and wait for them to end. A cancellation that lands inside a redis-py call can be
    swallowed (the task goes on to its next sleep): a bare gather then waited until supervisord's SIGKILL,
    and a worker's exit (its offline write) never came (seen 2 in ~60 drains). Such a task is cancelled
    again every 0.1 s, and after `patience_s` it is left behind (the caller is closing or exiting)."""
    deadline = time.monotonic() + patience_s
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: an error of a background task at exit is no news
        if time.monotonic() >= deadline:
            return


class JobSignals:
    """The pub/sub side of a worker process: wake-ups and cancellations, on one connection.

    Idle workers do not poll: `arm()` before a claim, and when the claim finds nothing, `wait()` returns as
    soon as `job_submitted` or `job_requeued` names a job type this worker serves (ids from those
    messages come back from the next `arm()`, to pass to `claim(hints=...)`, which indexes API-submitted
    jobs in the same round trip). `wait()` also returns at its timeout: the caller's slow fallback sweep
    for anything missed. After a lost connection it wakes the worker, since messages may have been lost.
    `cancel_job` messages call `on_cancel(job_id, reason)`; after a lost subscription, `on_resubscribed()` is
    called once subscribed again, for the caller to look up what it may have missed (the jobs it runs that
    were cancelled meanwhile).

    The subscription has a connection of its own whose replies stay bytes, decoded here with replacement: a
    message whose bytes are not UTF-8 (any publisher may send one) raised in redis-py's reader and cost the
    subscription (see `_undecoded_client` for why redis-py does not decode them).

    A subscription quiet for `ping_after_s` is PINGed, and one that does not answer within `pong_within_s` is
    taken for lost: a connection dropped without a word (a NAT entry gone) otherwise left a read that waited
    for ever, and the worker deaf to new jobs (found by the 5 s fallback sweep) and to cancels (the heartbeat).
    """

    _MAX_HINTS = 256

    def __init__(self, client: Any, job_types: Iterable[str], on_cancel: Any = None,
                 reconnect_delay_s: float = 0.5, on_resubscribed: Any = None,
                 ping_after_s: float = SIGNALS_PING_AFTER_S, pong_within_s: float = 2.0):
        self._client = _undecoded_client(client)
        self._types = set(job_types)
        self._on_cancel = on_cancel
        self._on_resubscribed = on_resubscribed
        self._reconnect_delay_s = reconnect_delay_s
        self._ping_after_s = ping_after_s
        self._pong_within_s = pong_within_s
        self._woken = False  # a wake-up came since the last arm(): the next wait() returns at once
        self._waiter: asyncio.Future | None = None  # the pending wait()'s future, resolved by a wake-up
        self._hints: list[str] = []
        self._task: Any = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="job-signals")
        await self._subscribed.wait()

    async def close(self) -> None:
        if self._task is not None:
            # Its loop waits in a redis-py call, where a cancellation can be lost: not waited on forever.
            await cancel_and_wait([self._task])
            self._task = None
        await self._client.aclose()

    async def __aenter__(self) -> JobSignals:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def arm(self) -> list[str]:
        """Clear the wake-up before a claim; returns the job ids announced since the last arm()."""
        self._woken = False
        hints, self._hints = self._hints, []
        return hints

    async def wait(self, timeout_s: float) -> bool:
        """True when woken by a job this worker serves (or by `interrupt()`), False when `timeout_s` passed.

        One future that the wake-up resolves, not `wait_for(event.wait())`: that wraps the wait in a task
        and takes three turns of the event loop from the message to this caller, where this takes one
        (the submit -> claim latency of an idle worker)."""
        if self._woken:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _resolve, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            if self._waiter is waiter:
                self._waiter = None

    def interrupt(self) -> None:
        """Wake a pending `wait()` (and the next one) as a job would: e.g. the worker starts draining."""
        self._set()

    def _set(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None:
            _resolve(waiter, True)

    def _handle(self, channel: str, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            if channel != CH_CANCEL:
                self._set()  # unreadable announcement: look rather than miss a job
            return
        # A field of the wrong type (another producer's) is read as absent: a list for service_required
        # raised TypeError here and ended the listener (no more wake-ups or cancels for this worker).
        job_id = msg.get("job_id")
        job_id = str(job_id) if isinstance(job_id, str | int) and not isinstance(job_id, bool) else ""
        if channel == CH_CANCEL:
            if job_id and self._on_cancel is not None:
                self._on_cancel(job_id, str(msg.get("reason") or ""))
            return
        service = msg.get("service_required")
        if isinstance(service, str) and service not in self._types:
            return
        # Not a job our own submit announced ("indexed": it indexed the job itself): a hint costs its claim a
        # check of the job's index entry against its hash, needed only for jobs the API wrote.
        if channel == CH_SUBMITTED and job_id and msg.get("indexed") is not True and len(self._hints) < self._MAX_HINTS:
            self._hints.append(job_id)
        self._set()

    async def _listen(self) -> None:
        # Imported here: the machine process uses this module without redis-py (see runtime/resp.py).
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeout

        first = True
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CH_SUBMITTED, CH_REQUEUED, CH_CANCEL)
                self._subscribed.set()
                if not first:
                    self._set()  # messages may have been missed while disconnected
                    if self._on_resubscribed is not None:
                        self._on_resubscribed()
                first = False
                heard, pinged = time.monotonic(), None  # when the connection last said anything; our PING's time
                while True:
                    now = time.monotonic()
                    if pinged is None and now - heard >= self._ping_after_s:
                        await pubsub.ping()
                        pinged = now
                    due = (pinged + self._pong_within_s) if pinged is not None else (heard + self._ping_after_s)
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=max(0.01, due - now))
                    if msg is None and pinged is not None and time.monotonic() >= due:
                        # (once more without waiting: a blocked event loop, not Redis, may have made us late)
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                        if msg is None:
                            _log.warning("job signals: no reply to PING within %gs; subscribing again",
                                         self._pong_within_s, extra={"event_type": "job_signals.deaf"})
                            raise RedisTimeout("no reply to PING")
                    if msg is None:
                        continue
                    heard, pinged = time.monotonic(), None
                    if msg.get("type") == "message":
                        try:
                            self._handle(_lenient_text(msg["channel"]), _lenient_text(msg["data"]))
                        except Exception:  # noqa: BLE001 - one message must never end the listener
                            _log.exception("job signal not handled; going on",
                                           extra={"channel": _lenient_text(msg["channel"])})
            except (RedisConnectionError, RedisTimeout, OSError):
                await asyncio.sleep(self._reconnect_delay_s)
            except Exception:  # noqa: BLE001 - one the reader cannot take: as after a lost connection
                _log.exception("job signals: reading a message failed; subscribing again")
                await asyncio.sleep(self._reconnect_delay_s)  # as after a lost connection: never a spin
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # closing a broken connection may fail again; nothing to keep
                    pass


# -- machine level: the health aggregator reads worker state; the status publisher writes machine status ----

CH_WORKER_STATUS = "worker_status"


def machine_status_channel(machine_id: str) -> str:
    return f"machine:status:{machine_id}"


@dataclass(frozen=True)
class WorkerRow:
    """What Redis says about one worker: its worker:{id} hash and whether its heartbeat key is alive."""

    worker_id: str
    status: str  # idle / busy / offline, "" when the worker never registered
    current_job_id: str
    last_status_change: str
    last_heartbeat: str
    heartbeat_ttl_ms: int  # > 0 while worker:{id}:heartbeat exists (the contract's liveness), else <= 0
    problem: str = ""  # why the worker's keys could not be read (a stray key of another type), else ""
    instance: str = ""  # the token of the process that registered last (worker.new_instance), "" when none


async def read_workers(client: Any, worker_ids: Iterable[str]) -> tuple[bool, list[WorkerRow]]:
    """PING and every worker's hash and heartbeat TTL in one round trip, on the machine's MiniRedis
    (runtime/resp.py; its execute_many returns error replies in place). Reachability is the PING's alone: an
    error reply for one worker's keys (worker:{id} holding a list, say) used to fail the whole read, so the
    machine reported Redis unreachable and every worker disconnected. Now it is that worker's own `problem`.
    A PING error reply (NOAUTH, LOADING...) is raised."""
    ids = list(worker_ids)
    commands: list[tuple[Any, ...]] = [("PING",)]
    for wid in ids:
        commands.append(("HMGET", worker_key(wid), "status", "current_job_id", "last_status_change", "last_heartbeat",
                         "instance"))
        commands.append(("PTTL", heartbeat_key(wid)))
    replies = await client.execute_many(commands)
    if isinstance(replies[0], Exception):
        raise replies[0]
    rows, stray = [], []
    for i, wid in enumerate(ids):
        fields, ttl = replies[1 + 2 * i], replies[2 + 2 * i]
        if isinstance(fields, Exception) or isinstance(ttl, Exception):
            stray.append(i)
            rows.append(WorkerRow(wid, "", "", "", "", 0, str(fields if isinstance(fields, Exception) else ttl)))
            continue
        status, job, changed, beat, instance = _text(fields)
        rows.append(WorkerRow(wid, status or "", job or "", changed or "", beat or "", int(ttl),
                              instance=instance or ""))
    if stray:  # rare: one more round trip, so the reason names what holds the key
        kinds = await client.execute_many([("TYPE", worker_key(rows[i].worker_id)) for i in stray])
        for i, kind in zip(stray, kinds):
            row = rows[i]
            if isinstance(kind, str | bytes) and _text(kind) not in ("hash", "none"):
                why = (f"worker:{row.worker_id} holds a {_text(kind)}, not the worker hash the job contract keeps "
                       f"there: delete or rename that stray key")
            else:
                why = f"reading worker:{row.worker_id} failed: {row.problem}"
            rows[i] = WorkerRow(row.worker_id, "", "", "", "", 0, why[:300])
    return replies[0] in ("PONG", b"PONG", True), rows


FINISHED_RETENTION_S = 7 * 86400  # an embedded Redis forgets finished jobs after this (as their timelines)


async def expire_finished(client: Any, now_ms: int, retention_s: float = FINISHED_RETENTION_S) -> int:
    """On the machine's embedded Redis only: delete the hashes, progress hashes and jobs:completed /
    jobs:failed entries of jobs that finished more than `retention_s` ago, and of jobs cancelled that long
    ago (jobs:cancelled: a cancel writes no jobs:failed entry) (expire_finished.lua, one chunk a call, EVAL on
    the machine's MiniRedis). Returns how many jobs were forgotten."""
    removed = 0
    for key in (COMPLETED, FAILED, CANCELLED):
        cursor = "0"
        while True:
            cursor, count = await _run_script(client, "expire_finished", key, cursor,
                                              int(now_ms - retention_s * 1000), _CHUNK)
            removed += int(count)
            if str(cursor) == "0":
                break
    return removed


async def _holder(client: Any, worker_id: str) -> tuple[str, str]:
    """(the `instance` token in worker:{id}, what is known of its process: identity.token_pid_state), read
    for a machine about to act for a dead worker of its own. ("", "legacy") when unreadable: the script that
    follows says why."""
    got = (await client.execute_many([("HGET", worker_key(worker_id), "instance")]))[0]
    instance = "" if isinstance(got, Exception) else (_text(got) or "")
    return instance, token_pid_state(instance)


async def mark_worker_offline(client: Any, worker_id: str) -> str | None:
    """For a worker that died and cannot say so itself: `worker:{id}` offline, heartbeat key gone, and
    `worker_status` published when that is a change (the worker_status script, by _run_script so that any
    client that can run a command will do). Returns the old status; None, writing nothing, while the id is
    held by a process that may be alive: another host's or container's (a machine of the same id overlapping
    in a deploy: its live workers were marked offline, their heartbeat keys deleted, and a worker of this
    machine then took their running jobs), or one of this pid space whose pid is alive. The write carries the
    token read, so a process that registers meanwhile keeps its own status (worker_status.lua)."""
    instance, state = await _holder(client, worker_id)
    if state in ("alive", "foreign"):
        return None
    return await _run_script(client, "worker_status", worker_id, "offline", "0",
                             *(("instance", instance) if instance else ()))


async def settle_dead_worker(client: Any, worker_id: str, reason: str) -> tuple[list[str], str]:
    """For a worker that is gone for good (its machine stopping; no replacement will start to do it): every job
    Redis says it runs back to the queue, no attempt counted (the hand-back script, as a drain does), and the
    worker offline. Over the machine's MiniRedis. Returns (the ids handed back, its status before: "" when
    it was offline already or never registered). Nothing is done while another live process may hold the id
    (see mark_worker_offline)."""
    instance, keys, status = await client.execute_many([("HGET", worker_key(worker_id), "instance"),
                                                        ("HKEYS", active_key(worker_id)),
                                                        ("HGET", worker_key(worker_id), "status")])
    for reply in (instance, keys, status):
        if isinstance(reply, Exception):
            raise reply
    if token_pid_state(_text(instance) or "") in ("alive", "foreign"):
        return [], ""  # another live process holds the id (see mark_worker_offline): its jobs are its own
    handed = [job_id for job_id in _text(keys)
              if await _run_script(client, "hand_back", job_id, worker_id, reason, "", "1") == "ok"]
    old = _text(status) or ""
    if not old or (old == "offline" and not handed):
        return handed, ""
    # offline (again: a hand-back's bookkeeping set an offline worker idle, as it stood with no job left)
    await mark_worker_offline(client, worker_id)
    return handed, "" if old == "offline" else old


async def reap_with(client: Any, lease_s: float, limit: int = 100) -> list[str]:
    """reap_expired_leases() over the machine's MiniRedis (_run_script, as mark_worker_offline): the machine
    reaps too, so the job of a worker that stalled is re-queued though no other worker of the fleet runs (a
    one-worker machine, or every worker of it wedged). `lease_s`: the longest lease the caller's workers use,
    which sets the confirmation wait as a store of that lease would."""
    reply = await _run_script(client, "reap", limit, int(_reap_confirm_s(lease_s) * 1000))
    return [str(x) for x in reply or []]


@functools.cache
def _source_and_sha(name: str) -> tuple[str, str]:
    source = script_source(name)
    return source, hashlib.sha1(source.encode()).hexdigest()


async def _run_script(client: Any, name: str, *args: Any) -> Any:
    """Script `name` on a client with MiniRedis's `execute` (the machine's): EVALSHA, and EVAL when the server
    lacks it (NOSCRIPT), which loads it for the next call. EVAL alone sent the ~39 KB source every time (the
    machine's reaper: 52 KB/s with 3 s leases)."""
    source, sha = _source_and_sha(name)
    keys = list(_FIXED_KEYS)
    try:
        reply = await client.execute("EVALSHA", sha, len(keys), *keys, *args)
    except Exception as exc:  # noqa: BLE001 - MiniRedis raises its RespError; only NOSCRIPT is ours to handle
        if "NOSCRIPT" not in str(exc):
            raise
        reply = await client.execute("EVAL", source, len(keys), *keys, *args)
    return _text(reply)


async def publish_machine_status(client: Any, machine_id: str, message: str) -> int:
    """PUBLISH machine:status:{machine_id} (the contract's machine status message, JSON text)."""
    return int(await client.publish(machine_status_channel(machine_id), message))

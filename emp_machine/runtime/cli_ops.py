"""Operator commands of `emp-machine`: the running machine (ps, restart, logs, errors) and its jobs (submit,
job, stuck, try). `cli.py` builds the parser and hands each command its arguments here.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from emp_machine.errors import EmpError, NoMachineRunning


# -- operating a running machine ----------------------------------------------------------------------------
class SeveralMachinesRunning(NoMachineRunning):
    """No machine named, and more than one runs: no command may fall back to a default, --manifest says which."""


def _target(args) -> dict:
    """The running machine's pointer document: from --manifest / $EMP_MANIFEST, else the only one running
    (under the per-user state root, or where the default manifest puts its state)."""
    from emp_machine.runtime import manifest as mf

    explicit = getattr(args, "manifest", None) or os.environ.get("EMP_MANIFEST")
    if explicit:
        state_dir = Path(mf.load(explicit).machine.state_dir)
        doc = mf.running_machine(state_dir)
        if doc is None:
            _check_readable(state_dir / "run")  # another user's machine (0700): not "no machine is running"
            raise NoMachineRunning(f"no machine is running for {explicit} (looked in {state_dir / 'run'})")
        return doc
    machines = {m["socket"]: m for m in mf.running_machines()}
    default_state = Path(mf.load(mf.default_manifest()).machine.state_dir)
    default = mf.running_machine(default_state)
    if default is not None:
        machines[default["socket"]] = default
    if not machines:
        _check_readable(default_state / "run")
        raise NoMachineRunning("no machine is running on this host; start one with "
                               "`emp-machine --manifest <file>`, or name its manifest with --manifest")
    if len(machines) > 1:
        names = ", ".join(f"{m['machine_id']} ({m['manifest']})" for m in machines.values())
        raise SeveralMachinesRunning(f"{len(machines)} machines are running ({names}); choose one with --manifest")
    return next(iter(machines.values()))


def _check_readable(folder: Path) -> None:
    from emp_machine.runtime.queries import check_readable

    check_readable(folder)


def _control(doc: dict):
    from emp_machine.supervisor.control import Supervisor

    return Supervisor(doc["socket"])


def cmd_ps(args) -> int:
    import psutil

    doc = _target(args)
    rows = _control(doc).processes()
    trees = {}
    for row in rows:
        if row.pid:
            try:
                root = psutil.Process(row.pid)
                trees[row.name] = [root, *root.children(recursive=True)]
                for proc in trees[row.name]:
                    proc.cpu_percent(None)
            except psutil.Error:
                pass
    time.sleep(0.25)  # cpu_percent needs two samples; one short interval for the whole table
    table = []
    for row in rows:
        cpu, rss = 0.0, 0
        for proc in trees.get(row.name, []):
            try:
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
            except psutil.Error:
                pass
        table.append({"name": row.name, "pid": row.pid or None, "state": row.state.lower(),
                      "uptime_s": round(row.uptime), "restarts": row.restarts, "cpu_percent": round(cpu, 1),
                      "memory_bytes": rss, "errored_reason": row.errored_reason or None})
    if args.json:
        print(json.dumps({"machine_id": doc["machine_id"], "processes": table}, indent=2))
        return 0
    from emp_machine.units import format_size

    print(f"machine {doc['machine_id']}  ({doc['manifest']})")
    header = f"{'NAME':<18} {'PID':>7}  {'STATE':<9} {'UPTIME':>8} {'RESTARTS':>8} {'CPU%':>6} {'MEMORY':>9}"
    print(header)
    for t in table:
        print(f"{t['name']:<18} {t['pid'] or '-':>7}  {t['state']:<9} {_ago(t['uptime_s']) if t['pid'] else '-':>8} "
              f"{t['restarts']:>8} {t['cpu_percent']:>6} {format_size(t['memory_bytes']) if t['pid'] else '-':>9}")
        if t["errored_reason"]:
            print(f"{'':<18} errored: {t['errored_reason']}")
    return 0


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def cmd_restart(args) -> int:
    doc = _target(args)
    control = _control(doc)
    names = [r.name for r in control.processes()]
    if args.name == "all":
        targets = [n for n in names if n != "redis"]
    elif args.name in names:
        targets = [args.name]
    else:  # a manifest service or worker-group name: every instance of it (as `pm2 restart APP`)
        groups = _instances(Path(doc["logs"]).parent, doc.get("manifest"))
        targets = [n for n in groups.get(args.name, []) if n in names]
        if not targets:
            import difflib

            close = difflib.get_close_matches(args.name, [*names, *groups], n=1)
            hint = (f"; did you mean {close[0]}?" if close else
                    f"; processes: {', '.join(names)}" + (f"; services and worker groups: {', '.join(groups)}"
                                                          if groups else ""))
            raise EmpError(f"no process named {args.name}{hint}")
    if getattr(args, "rolling", False):  # `reload`: one at a time, as `pm2 reload`, so the rest keep working
        results = []
        for name in targets:
            _refuse_while_stopping(doc, name)  # checked before each: a drain may begin during a group's restarts
            results.append(_restart_one(doc["socket"], name))
            _report_restart(name, results[-1])
    else:  # `restart`: every target at once, as `pm2 restart`; each stops within its own grace
        from concurrent.futures import ThreadPoolExecutor

        _refuse_while_stopping(doc, targets[0])

        with ThreadPoolExecutor(min(len(targets), _RESTART_AT_ONCE)) as pool:
            results = list(pool.map(lambda name: _restart_one(doc["socket"], name), targets))
        for name, error in zip(targets, results):
            _report_restart(name, error)
    failed = [name for name, error in zip(targets, results) if error is not None]
    if failed:  # as `pm2 restart`: every target is tried; those that could not restart are listed at the end
        raise EmpError(f"{len(failed)} of {len(targets)} process(es) could not restart: {', '.join(failed)} "
                       f"(see above; `emp-machine logs <name>` shows why)")
    return 0


_RESTART_AT_ONCE = 32  # restarts `restart` runs at once (each holds one supervisord connection)


def _restart_one(socket: str, name: str) -> str | None:
    """One graceful restart through supervisord; the reason it could not be done, or None."""
    from emp_machine.supervisor.control import Supervisor

    try:
        Supervisor(socket, timeout=120).restart(name)
    except EmpError as exc:
        return str(exc)
    return None


def _report_restart(name: str, error: str | None) -> None:
    if error is None:
        print(f"restarted {name}", flush=True)
    else:
        print(f"could not restart {name}: {error}", file=sys.stderr, flush=True)


def _refuse_while_stopping(doc: dict, name: str) -> None:
    """As the machine's own restart endpoint does: no restart once it drains (it stops what it restarted)."""
    phase = _machine_phase(doc)
    if phase in ("draining", "shutdown"):
        raise EmpError(f"cannot restart {name}: the machine is {phase} (it is stopping every process to "
                       f"exit; start the machine again once it has exited)")


def _machine_phase(doc: dict) -> str | None:
    """The machine's phase from its health server's /ready (starting, ready, draining, shutdown); None when
    the server does not answer (a machine that answers nothing is no drain to protect)."""
    import urllib.error
    import urllib.request

    port = doc.get("health_port")
    if not port:
        return None
    host = doc.get("health_host") or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # this host's server: no proxy
    try:
        with opener.open(url, timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as err:  # 503 while starting or draining: the body still names the phase
        body = err.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        phase = json.loads(body).get("phase")
    except (ValueError, AttributeError):
        return None
    return phase if isinstance(phase, str) else None


def _instances(state_dir: Path, manifest_source) -> dict[str, list[str]]:
    """Each manifest service and worker-group name -> its process names, laid out as the machine lays them
    out: from the resolved manifest it runs (or last ran) from, run/manifest.json, else the manifest file.
    A service and a worker group of the same name: both. {} when neither can be read."""
    from emp_machine.runtime import hardware, plan

    resolved = state_dir / "run" / "manifest.json"
    try:
        if resolved.is_file():
            from emp_machine.runtime.view import View

            manifest = View.load(resolved)
        elif manifest_source:
            from emp_machine.runtime import manifest as mf

            manifest = mf.load(manifest_source)
        else:
            return {}
        laid = plan.build(manifest, hardware.probe(), resolved_manifest=resolved, environ=dict(os.environ),
                          redis_port=1)  # (the embedded Redis's port is not needed for names)
    except (EmpError, OSError, ValueError, LookupError, AttributeError, TypeError):
        return {}
    groups: dict[str, list[str]] = {}
    for service in laid.services:
        groups.setdefault(service.service, []).append(service.process)
    for worker in laid.workers:
        groups.setdefault(worker.group, []).append(worker.process)
    return groups


def cmd_errors(args) -> int:
    from emp_machine.runtime import queries
    from emp_machine.units import parse_duration

    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        raise EmpError(f"--since: {exc}") from None
    if args.machine:
        try:
            wait = parse_duration(args.wait)
        except ValueError as exc:
            raise EmpError(f"--wait: {exc}") from None
        source = args.machine if args.machine.startswith(("http://", "https://")) else _health_url_of(args, wait)
        rows = _remote_errors(source, args.since)
    else:
        logs_dir = _logs_dir(args)[0]
        source = str(logs_dir)
        _mask_machine_secrets(logs_dir.parent)
        rows = queries.recent_errors(logs_dir, since)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no errors in the last {args.since} ({source})")
        return 0
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["at"]))
        job = f" job={row['job_id']}" if row.get("job_id") else ""
        trace = f" trace={row['trace_id']}" if row.get("trace_id") else ""
        _say(f"{when}Z {row['process']:<12} {row['event'] or '':<18} {row['message']}{job}{trace}")
    return 0


def _mask_machine_secrets(state_dir: Path) -> None:
    """Mask the machine's secret values exactly (a service printing its own token), as the machine does in what
    it ships, in what this command prints from the raw log files: from the resolved manifest the machine runs
    (or last ran) from, and this environment. Unreadable: the patterns alone, as before."""
    from emp_machine.runtime.identity import machine_secrets
    from emp_machine.runtime.view import View
    from emp_machine.telemetry.redact import set_secret_values

    try:
        set_secret_values(machine_secrets(View.load(state_dir / "run" / "manifest.json"), os.environ))
    except (EmpError, OSError, ValueError, LookupError, AttributeError, TypeError):
        pass


def _health_url_of(args, wait_s: float = 12.0) -> str:
    """A machine's health_url from its next status message within `wait_s` (machines publish one every 10 s)."""
    from emp_machine.runtime.jobs import machine_status_channel

    client, _ = _store(args)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(machine_status_channel(args.machine))
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message and message.get("type") == "message":
                try:
                    url = json.loads(message["data"]).get("health_url")
                except (TypeError, ValueError):
                    continue
                if url:
                    return url
    finally:
        pubsub.close()
    raise EmpError(f"no status message from machine {args.machine} within {wait_s:g} s: is it running and using "
                   f"this Redis?")


HEALTH_TOKEN_ENV = "EMP_HEALTH_TOKEN"  # the default health.token_env: the bearer token `errors --machine` sends


def _remote_errors(base_url: str, since: str) -> list:
    import urllib.error
    import urllib.parse
    import urllib.request

    from emp_machine.runtime.identity import redact_url, redact_urls

    url = f"{base_url.rstrip('/')}/errors?since={urllib.parse.quote(since)}"
    # A machine with a health token serves /errors only with it (others: only to their own host).
    token = os.environ.get(HEALTH_TOKEN_ENV, "").strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    shown = redact_url(url)  # a --machine URL may carry user:password@
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            if not token and "no token is configured" in _error_text(exc):
                # a machine without a token answers its own host only, by a loopback address: its health_url
                # names the host as the fleet reaches it, so even a read on that host was refused
                port = urllib.parse.urlsplit(base_url).port
                raise EmpError(f"could not read errors from {shown}: {exc.code}: the machine has no health token, "
                               "so it answers /errors only to its own host by a loopback address: on that host "
                               f"use --machine http://127.0.0.1:{port or '<health port>'}; to read them from "
                               f"elsewhere, start it with a health token (health.token_env) and set "
                               f"{HEALTH_TOKEN_ENV} here to the same") from None
            given = "was refused" if token else "is needed"
            raise EmpError(f"could not read errors from {shown}: {exc.code}: the machine's health token {given} "
                           f"(set {HEALTH_TOKEN_ENV} to the token the machine was started with)") from None
        raise EmpError(f"could not read errors from {shown}: {redact_urls(str(exc))}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EmpError(f"could not read errors from {shown}: {redact_urls(str(exc))}") from None


def _error_text(exc) -> str:
    """The `error` of a JSON error answer (the health server's), '' when there is none to read."""
    try:
        error = json.loads(exc.read(4096)).get("error")
    except (OSError, ValueError, AttributeError):
        return ""
    return error if isinstance(error, str) else ""


def _logs_dir(args) -> tuple[Path, object, NoMachineRunning | None]:
    """(the machine's logs folder, its manifest, None): the running machine's; else (stopped or crashed: its
    logs are still worth reading) the folder in the manifest's state dir, with the NoMachineRunning met.
    Several machines running is the user's to settle (--manifest): raised."""
    from emp_machine.runtime import manifest as mf

    try:
        doc = _target(args)
        return Path(doc["logs"]), doc.get("manifest"), None
    except SeveralMachinesRunning:
        raise  # --manifest says which
    except NoMachineRunning as exc:
        source = getattr(args, "manifest", None) or mf.default_manifest()
        logs_dir = Path(mf.load(source).machine.state_dir) / "logs"
        _check_readable(logs_dir)
        return logs_dir, source, exc


def cmd_logs(args) -> int:
    logs_dir, source, not_running = _logs_dir(args)
    if not_running is not None:  # a stopped or crashed machine's logs are still on disk: read those
        if not logs_dir.is_dir():
            raise not_running
        from emp_machine.runtime import manifest as mf

        which = ("the built-in simulation manifest's machine" if Path(source) == mf.BUILTIN_DEFAULT
                 else f"the machine of {source}")
        hint = "" if getattr(args, "manifest", None) else " (--manifest FILE for another machine's)"
        print(f"emp-machine: no machine is running; showing the log files of {which} in {logs_dir}{hint}",
              file=sys.stderr, flush=True)
    path = logs_dir / f"{args.name}.log"
    if path.exists():
        for line in _tail(path, args.lines):
            sys.stdout.write(line)
        sys.stdout.flush()
        if args.follow:
            _follow(path)
        return 0
    # a manifest service or worker-group name: each instance's log, lines prefixed (as `pm2 logs APP`)
    groups = _instances(logs_dir.parent, source)
    paths = {n: logs_dir / f"{n}.log" for n in groups.get(args.name, []) if (logs_dir / f"{n}.log").exists()}
    if not paths:
        available = sorted(p.stem for p in logs_dir.glob("*.log"))
        kinds = f"; services and worker groups: {', '.join(groups)}" if groups else ""
        raise EmpError(f"no log for {args.name} at {path}; logs: {', '.join(available) or 'none yet'}{kinds}")
    width = max(len(n) for n in paths)
    for name, p in paths.items():
        if args.lines > 0:
            sys.stdout.write(f"==> {name}: {p} (last {args.lines} lines) <==\n")
        for line in _tail(p, args.lines):
            end = "" if line.endswith("\n") else "\n"
            sys.stdout.write(f"{name:<{width}} | {line}{end}")
    sys.stdout.flush()
    if args.follow:
        _follow_many(paths, width)
    return 0


def _tail(path: Path, count: int) -> list[str]:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        block, data = 8192, b""
        while end > 0 and data.count(b"\n") <= count:
            step = min(block, end)
            end -= step
            fh.seek(end)
            data = fh.read(step) + data
    lines = data.decode("utf-8", "replace").splitlines(keepends=True)
    return lines[-count:] if count > 0 else []


class _Appended:
    """What is appended to a log file from now on, across supervisord's rotations (reopened by name when
    the file there is another one, or shorter than what was read)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "rb")
        self.fh.seek(0, os.SEEK_END)
        self.inode = os.fstat(self.fh.fileno()).st_ino

    def read(self) -> bytes:
        chunk = self.fh.read()
        if chunk:
            return chunk
        try:
            st = os.stat(self.path)
            if st.st_ino != self.inode or st.st_size < self.fh.tell():
                self.fh.close()
                self.fh = open(self.path, "rb")
                self.inode = os.fstat(self.fh.fileno()).st_ino
                return self.fh.read()
        except FileNotFoundError:
            pass
        return b""


def _follow(path: Path) -> None:
    """Print lines as they are appended; reopen when supervisord rotates the file."""
    log = _Appended(path)
    while True:
        chunk = log.read()
        if chunk:
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
            continue
        time.sleep(0.2)


def _follow_many(paths: dict[str, Path], width: int) -> None:
    """Follow several logs at once: whole lines as they come, each prefixed with its process name."""
    logs = {name: _Appended(path) for name, path in paths.items()}
    partial = {name: b"" for name in paths}
    while True:
        wrote = False
        for name, log in logs.items():
            chunk = log.read()
            if not chunk:
                continue
            *lines, partial[name] = (partial[name] + chunk).split(b"\n")
            for line in lines:
                sys.stdout.write(f"{name:<{width}} | {line.decode('utf-8', 'replace')}\n")
                wrote = True
        if wrote:
            sys.stdout.flush()
        else:
            time.sleep(0.2)


# -- telemetry buffers --------------------------------------------------------------------------------------
_KINDS = {1: "spans", 2: "logs", 3: "metrics"}  # buffer.Kind
_SPAN_STATUS = {0: "unset", 1: "ok", 2: "error"}
_SPAN_KEYS = ("job.id", "job.type", "job.attempt", "connector.id", "error.type", "http.response.status_code")


def _state_dir(args) -> Path:
    """--state-dir; else the running machine's (found as `ps` and `logs` find it); else, for a stopped machine,
    the manifest's state_dir (as `errors` does)."""
    from emp_machine.runtime import manifest as mf

    if args.state_dir:
        return Path(args.state_dir)
    try:
        return Path(_target(args)["logs"]).parent  # the pointer names <state_dir>/logs
    except SeveralMachinesRunning:
        raise  # --manifest says which
    except NoMachineRunning:
        explicit = getattr(args, "manifest", None) or os.environ.get("EMP_MANIFEST")
        return Path(mf.load(explicit or mf.default_manifest()).machine.state_dir)


def cmd_telemetry(args) -> int:
    """Each process's buffer, read-only: safe while the machine runs (see buffer.inspect_buffer). Records are
    redacted before they are buffered; nothing of the configuration is shown (each buffer keeps its own limit)."""
    from emp_machine.telemetry.buffer import BufferUnreadable, inspect_buffer

    state_dir = _state_dir(args)
    folder = state_dir / "telemetry"
    found = sorted(folder.glob("*.db"))
    if args.process:
        path = folder / f"{args.process}.db"
        if Path(args.process).name != args.process or not path.is_file():
            names = ", ".join(p.stem for p in found) or "none"
            raise EmpError(f"no telemetry buffer for process {args.process!r} in {folder}; buffers: {names}")
        found = [path]
    if not found:
        raise EmpError(f"no telemetry buffers in {folder} (none written yet, or not this machine's state dir)")
    now = time.time()
    buffers: list[dict] = []
    spans: list[dict] = []
    logs: list[dict] = []
    dead: list[dict] = []
    for path in found:
        process = path.stem
        try:
            report = inspect_buffer(path, spans=args.spans, logs=args.logs, dead_letters=args.dead_letters)
        except BufferUnreadable as exc:
            buffers.append({"process": process, "path": str(path), "error": str(exc)})
            continue
        buffers.append({
            "process": process, "path": str(path), "owner_running": report.owner_running,
            "pending": {name: report.pending.get(kind, 0) for kind, name in _KINDS.items()},
            "stored_bytes": report.stored_bytes, "limit_bytes": report.max_size,
            "oldest_pending_age_s": None if report.oldest_created is None else round(now - report.oldest_created, 1),
            "dropped": report.dropped, "dead_letter_records": report.dead_letter_records})
        spans.extend(_span_row(process, record) for record in report.spans)
        logs.extend(_log_row(process, record) for record in report.logs)
        dead.extend({"process": process, "kind": _KINDS.get(kind, str(kind)), "count": count, "reason": reason,
                     "at": created} for kind, count, reason, created in report.dead_letters)
    spans = sorted(spans, key=lambda row: row["end"])[-args.spans:] if args.spans else []
    logs = sorted(logs, key=lambda row: row["time"])[-args.logs:] if args.logs else []
    dead.sort(key=lambda row: row["at"])
    failed = any("error" in b for b in buffers)
    listing = bool(args.spans or args.logs or args.dead_letters)
    if args.json:
        doc: dict = {"state_dir": str(state_dir), "buffers": buffers}
        if args.spans:
            doc["spans"] = spans
        if args.logs:
            doc["logs"] = logs
        if args.dead_letters:
            doc["dead_letters"] = dead
        print(json.dumps(doc, indent=2, default=str))
        return 1 if failed else 0
    if not listing:
        _print_buffers(folder, buffers)
        return 1 if failed else 0
    for b in buffers:  # the listings below leave these out: say so
        if "error" in b:
            print(f"emp-machine: {b['error']}", file=sys.stderr)
    sections = []
    if args.spans:
        sections.append(_span_lines(spans))
    if args.logs:
        sections.append(_log_lines(logs))
    if args.dead_letters:
        sections.append(_dead_lines(dead))
    print("\n\n".join("\n".join(lines) for lines in sections))
    return 1 if failed else 0


def _span_row(process: str, record: tuple) -> dict:
    trace_id, span_id, parent, name, _kind, start, end, attributes, status, status_message = record[:10]
    return {"process": process, "trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}",
            "parent_span_id": f"{parent:016x}" if parent else None, "name": name, "start": start / 1e9,
            "end": end / 1e9, "duration_ms": round((end - start) / 1e6, 3),
            "status": _SPAN_STATUS.get(status, str(status)), "status_message": status_message or None,
            "attributes": attributes or {}}


def _log_row(process: str, record: tuple) -> dict:
    time_ns, _severity, level, message, attributes, trace_id, _span_id, event_name = record
    attributes = attributes if isinstance(attributes, dict) else {}
    return {"process": process, "time": time_ns / 1e9, "level": level,
            "message": message if isinstance(message, str) else json.dumps(message, default=str),
            "event": event_name or None, "job_id": attributes.get("job_id") or None,
            "trace_id": f"{trace_id:032x}" if trace_id else None}


def _width(rows: list[dict]) -> int:
    """The PROCESS column's width: worker ids are as long as the machine id makes them."""
    return max([7, *(len(r["process"]) for r in rows)])


def _print_buffers(folder: Path, buffers: list[dict]) -> None:
    from emp_machine.units import format_size

    w = _width(buffers)
    print(f"telemetry buffers in {folder} (records show up to 2 s after they are made; OLDEST: the oldest "
          f"pending record's commit)")
    print(f"{'PROCESS':<{w}} {'OWNER':<8} {'SPANS':>7} {'LOGS':>7} {'METRICS':>7} {'STORED / LIMIT':>19} "
          f"{'OLDEST':>6} {'DEAD':>5}  DROPPED")
    for b in buffers:
        if "error" in b:
            print(f"{b['process']:<{w}} {b['error']}")
            continue
        owner = {True: "running", False: "stopped"}.get(b["owner_running"], "?")
        pending = b["pending"]
        limit = b["limit_bytes"]
        stored = f"{format_size(b['stored_bytes'])} / {format_size(limit) if limit is not None else '?'}"
        age = _ago(max(0, b["oldest_pending_age_s"])) if b["oldest_pending_age_s"] is not None else "-"
        dropped = ", ".join(f"{reason}={count}" for reason, count in sorted(b["dropped"].items()) if count) or "-"
        print(f"{b['process']:<{w}} {owner:<8} {pending['spans']:>7} {pending['logs']:>7} {pending['metrics']:>7} "
              f"{stored:>19} {age:>6} {b['dead_letter_records']:>5}  {dropped}")


def _span_lines(rows: list[dict]) -> list[str]:
    from emp_machine.runtime.queries import format_at, format_ms

    if not rows:
        return ["no pending spans"]
    w = _width(rows)
    lines = [f"{'END (UTC)':<12}  {'PROCESS':<{w}} {'TRACE_ID':<32} {'SPAN_ID':<16} {'NAME':<22} {'DURATION':>9} "
             f"{'STATUS':<6} ATTRIBUTES"]
    for r in rows:
        keys = " ".join(f"{k}={r['attributes'][k]}" for k in _SPAN_KEYS if k in r["attributes"])
        status = r["status"] + (f" ({r['status_message'][:60]})" if r["status_message"] else "")
        lines.append(f"{format_at(int(r['end'] * 1000)):<12}  {r['process']:<{w}} {r['trace_id']} {r['span_id']} "
                     f"{r['name'][:22]:<22} {format_ms(r['duration_ms']):>9} {status:<6} {keys}")
    return lines


def _log_lines(rows: list[dict]) -> list[str]:
    from emp_machine.runtime.queries import format_at

    if not rows:
        return ["no pending log records"]
    w = _width(rows)
    lines = [f"{'TIME (UTC)':<12}  {'PROCESS':<{w}} {'LEVEL':<8} {'EVENT':<24} MESSAGE"]
    for r in rows:
        job = f"  job={r['job_id']}" if r["job_id"] else ""
        lines.append(f"{format_at(int(r['time'] * 1000)):<12}  {r['process']:<{w}} {r['level']:<8} "
                     f"{r['event'] or '-':<24} {r['message'][:200].replace(chr(10), ' | ')}{job}")
    return lines


def _dead_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["no dead-lettered batches"]
    w = _width(rows)
    lines = [f"{'AT (UTC)':<20} {'PROCESS':<{w}} {'KIND':<8} {'COUNT':>6}  REASON"]
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["at"]))
        lines.append(f"{when}Z {r['process']:<{w}} {r['kind']:<8} {r['count']:>6}  {r['reason']}")
    return lines


# -- jobs -------------------------------------------------------------------------------------------------
def _store(args):
    """A sync JobStore on: --redis, else the running machine's Redis, else the manifest's redis.url."""
    import redis

    from emp_machine.runtime import manifest as mf
    from emp_machine.runtime.identity import redact_url
    from emp_machine.runtime.jobs import JobStore, redis_socket_options

    url = args.redis
    if not url:
        try:
            url = _target(args).get("redis_url")
        except SeveralMachinesRunning:
            raise  # the job would go to whichever Redis the default manifest names: --manifest says which
        except NoMachineRunning:
            url = None
    if not url:
        manifest = mf.load(getattr(args, "manifest", None) or mf.default_manifest())
        url = manifest.redis.url
        if url == "embedded":
            raise NoMachineRunning("the manifest uses an embedded Redis and no machine is running: start the "
                                   "machine first, or pass --redis URL")
    try:
        # encoding_errors: a field or a message that is not UTF-8 (another producer's bytes, on channels every
        # job shares) is shown with U+FFFD; strict decoding raised out of `job` and every `submit --wait`
        client = redis.Redis.from_url(url, decode_responses=True, encoding_errors="replace",
                                      **redis_socket_options(url))
    except ValueError:  # redis-py's message quotes the URL: only the redacted form is shown
        raise EmpError(f"not a Redis URL: {redact_url(url)} (expected redis://[:password@]host:port/db, "
                       f"rediss://… or unix://…)") from None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise EmpError(f"Redis at {redact_url(url)} is not reachable: {_redis_reason(exc, url)}") from None
    return client, JobStore(client)


def _redis_reason(exc: BaseException, url: str) -> str:
    """Why redis-py could not reach the server (a refused connection, a certificate that does not verify),
    without the URL's user or password should its message quote them."""
    text = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    try:
        parts = urlsplit(url)
        secrets = {s for s in (parts.password, parts.username) if s}
    except ValueError:
        secrets = set()
    for secret in secrets | {unquote(s) for s in secrets}:
        text = text.replace(secret, "***")
    from emp_machine.runtime.identity import redact_url

    return redact_url(text)[:300]


def _payload(text: str):
    """--payload as JSON text or @file."""
    try:
        raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
        return json.loads(raw)
    except OSError as exc:
        raise EmpError(f"--payload file cannot be read: {exc}") from None
    except ValueError as exc:
        raise EmpError(f"--payload is not JSON: {exc}") from None
    except RecursionError:
        raise EmpError("--payload is JSON nested too deeply to read (past Python's recursion limit)") from None


def cmd_try(args) -> int:
    import asyncio

    from emp_machine.connectors.trying import try_connector

    settings = {}
    for item in args.setting:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EmpError(f"--setting {item!r}: expected KEY=VALUE")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return asyncio.run(try_connector(args.connector, settings, _payload(args.payload), args.output_dir))


def cmd_submit(args) -> int:
    from emp_machine.runtime import queries
    from emp_machine.telemetry.redact import redact_text

    payload = _payload(args.payload)
    from emp_machine.telemetry.context import new_span_id, new_trace_id

    client, store = _store(args)
    # Like an EMP API producer, start the job's trace here: the worker's job.execution continues it, and
    # `emp-machine job` can name the trace id to look up in the tracing backend.
    trace = {"job_trace_id": new_trace_id(), "job_span_id": new_span_id()}
    try:
        job_id = store.submit(args.type, payload, priority=args.priority, max_retries=args.max_retries,
                              trace=trace)
    except ValueError as exc:  # the contract's fields refused a value (jobs.contract_fields names it)
        raise EmpError(f"job not submitted: {exc}") from None
    print(job_id, flush=True)
    if not args.wait:
        return 0
    progress = _ProgressView(sys.stdout)
    try:
        job = queries.wait_for_end(client, job_id, progress.update, args.timeout, on_note=progress.note)
    except KeyboardInterrupt:
        progress.end_line()
        print(f"{job_id}: no longer followed (the job goes on; `emp-machine job {job_id}` shows where it is)",
              file=sys.stderr)
        return 130
    except EmpError:
        progress.end_line()
        raise
    progress.end_line()
    status = job.get("status") or "unknown"
    if status not in queries.END_STATUSES:
        print(f"{job_id}: still {status} after {args.timeout:g}s (the job goes on)")
        return WAIT_TIMED_OUT
    error = redact_text(job.get("error") or "")
    _say(f"{job_id}: {status}" + (f" ({error})" if status != "completed" and error else ""))
    return 0 if status == "completed" else 1


# Control characters other than a tab (C0, DEL, C1): text the commands print from Redis or the logs (a job id,
# an error, a progress message: the producer's or a service's) could set the terminal's title, erase lines or
# forge lines of output with them. Shown escaped instead.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """`text` with its control characters (but tabs) written as \\xNN escapes, for a terminal."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _say(text: str) -> None:
    print(terminal_safe(text))


WAIT_TIMED_OUT = 124  # `submit --wait`: 0 completed, 1 failed or cancelled, 124 timed out, 130 interrupted


class _ProgressView:
    """`submit --wait`'s progress: a bar redrawn in place on a terminal; elsewhere (a log file, a pipe) a
    plain line each time the percent enters another 10 % step, so a log holds no carriage returns."""

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.drawn = False  # a bar is on the current line
        self.step = None  # the last 10 % step printed (not on a terminal)

    def update(self, percent: float, message: str) -> None:
        message = terminal_safe(" ".join(message.split()))  # one line, no control character, whatever was sent
        if self.tty:
            filled = int(percent / 5)
            self.out.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {percent:5.1f}% {message[:40]:<40}")
            self.out.flush()
            self.drawn = True
            return
        step = int(percent) // 10
        if step != self.step:  # up as the job goes on, down when a retry starts over
            self.step = step
            self.out.write(f"progress {int(percent)}%" + (f"  {message[:100]}" if message else "") + "\n")
            self.out.flush()

    def note(self, text: str) -> None:
        self.end_line()
        print(text, file=sys.stderr, flush=True)

    def end_line(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


def _read_failed(client, exc, what: str, expected: dict[str, str]) -> EmpError:
    """A Redis error while reading for `what`, as an error for the operator. For a WRONGTYPE reply, the keys
    of `expected` (key -> the kind the job contract keeps there) are looked at to name the one at fault."""
    import redis

    if isinstance(exc, redis.ResponseError) and str(exc).startswith("WRONGTYPE"):
        wrong = []
        for key, kind in expected.items():
            try:
                actual = client.type(key)
            except redis.RedisError:
                continue
            if actual not in ("none", kind):
                wrong.append(f"{key} holds a {actual}, where the job contract keeps a {kind}")
        if wrong:
            return EmpError(f"cannot read {what}: {'; '.join(wrong)} (not written by the EMP API or a worker: "
                            f"check the name, and delete or rename a stray key)")
        return EmpError(f"cannot read {what}: a key of the job contract holds the wrong kind of value ({exc})")
    return EmpError(f"cannot read {what} from Redis: {exc.__class__.__name__}: {exc}")


def cmd_job(args) -> int:
    import redis

    from emp_machine.runtime import queries
    from emp_machine.runtime.jobs import events_key, job_key, progress_key

    client, store = _store(args)
    try:
        doc = queries.timeline(store, args.job_id)
    except redis.RedisError as exc:
        raise _read_failed(client, exc, f"job {args.job_id}", {
            job_key(args.job_id): "hash", progress_key(args.job_id): "hash", events_key(args.job_id): "list",
        }) from None
    if doc is None:
        raise EmpError(f"no job {args.job_id} in Redis")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    default = " (default)" if doc["max_retries_is_default"] else ""  # the hash has none: the contract's 3
    _say(f"job {doc['job_id']}  type {doc['service_required']}  status {doc['status']}  "
          f"retries {doc['retry_count']}/{doc['max_retries']}{default}  total {queries.format_ms(doc['total_ms'])}")
    if doc["trace_id"]:
        _say(f"trace {doc['trace_id']}")
    if doc.get("clock_note"):
        _say(f"note {doc['clock_note']}")
    if doc["error"]:
        _say(f"error {doc['error']}")
    elif doc["earlier_error"]:
        _say(f"earlier attempt failed: {doc['earlier_error']}")
    progress = doc["progress"]
    if progress.get("progress"):  # the last update the worker sent (job:{id}:progress)
        _say(f"progress {progress['progress']}%" + (f"  {progress['message']}" if progress.get("message") else "")
              + (f"  at {progress['updated_at']}" if progress.get("updated_at") else ""))
    if doc["durations"]:
        _say("steps " + ", ".join(f"{name.removesuffix('_ms').replace('_', ' ')} {queries.format_ms(ms)}"
                                     for name, ms in doc["durations"].items()))
    _say(f"{'AT (UTC)':<13} {'STEP':<14} {'+TIME':>9}  {'WORKER':<28} DETAIL")
    for step in doc["steps"]:
        _say(f"{queries.format_at(step['at_ms']):<13} {step['event']:<14} "
              f"{queries.format_ms(step['since_previous_ms']):>9}  {step['worker_id']:<28} {step['detail']}")
    return 0


def _active_job_keys(client) -> dict[str, str]:
    """For a WRONGTYPE while listing stuck jobs: the job:{id} keys the jobs:active:* hashes name that hold
    something other than a hash (each -> "hash", for _read_failed to name). Type checks in pipelined batches:
    a busy Redis names thousands of running jobs."""
    import redis

    from emp_machine.runtime.jobs import job_key

    wrong: dict[str, str] = {}
    try:
        for key in client.scan_iter(match="jobs:active:*", count=500):
            if client.type(key) != "hash":
                continue  # named by jobs.stuck_jobs itself
            ids = client.hkeys(key)
            for start in range(0, len(ids), 500):
                keys = [job_key(job_id) for job_id in ids[start:start + 500]]
                pipe = client.pipeline(transaction=False)
                for k in keys:
                    pipe.type(k)
                wrong.update({k: "hash" for k, kind in zip(keys, pipe.execute()) if kind not in ("hash", "none")})
                if len(wrong) >= 20:  # enough to name: the message stays readable
                    return wrong
    except redis.RedisError:
        pass  # the error being reported says enough
    return wrong


def cmd_stuck(args) -> int:
    import redis

    from emp_machine.runtime import queries
    from emp_machine.runtime.jobs import LEASES

    client, store = _store(args)
    try:
        rows = queries.stuck(store)
    except ValueError as exc:  # a jobs:active:* key that is no hash (jobs.stuck_jobs names it)
        raise EmpError(f"cannot list stuck jobs: {exc}") from None
    except redis.RedisError as exc:
        raise _read_failed(client, exc, "the stuck jobs", {LEASES: "zset", **_active_job_keys(client)}) from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no stuck jobs")
        return 0
    print(f"{'JOB':<40} {'STATUS':<12} {'WORKER':<30} REASON")
    for row in rows:
        _say(f"{row['job_id']:<40} {row['status']:<12} {row['worker_id']:<30} {row['reason']}")
    return 0
